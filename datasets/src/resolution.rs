//! Images of low intrinsic dimension: each image averaged down to a coarse grid and
//! interpolated back to its size, so that neighbouring pixels are nearly equal (the inputs on
//! which a curvature estimate is nearly singular).

use rand::rngs::StdRng;

use crate::error::DatasetError;
use crate::sample::{Sample, SampleSource};

/// A source whose images are block-averaged to `side x side` and bilinearly upsampled back.
pub struct LowResolution<S> {
    /// The wrapped source.
    pub inner: S,
    /// Side of the coarse grid.
    pub side: usize,
}

impl<S: SampleSource> LowResolution<S> {
    /// Wraps `inner`; the coarse side must be at least 1 and at most the images' sides.
    pub fn new(inner: S, side: usize) -> Result<Self, DatasetError> {
        let [_, h, w] = inner.sample_shape();
        if side == 0 || side > h.min(w) {
            return Err(DatasetError::Invalid(format!(
                "a coarse grid of {side}x{side} does not fit images of {h}x{w}: expected a side \
                 from 1 to {}",
                h.min(w)
            )));
        }
        Ok(Self { inner, side })
    }
}

/// Block means of a `h x w` plane over a `side x side` grid (cell `(i, j)` covers the rows
/// `i h / side .. (i + 1) h / side`, at least one), then bilinear interpolation back to `h x w`
/// (cell centres at `(i + 1/2) h / side`, clamped at the borders).
pub fn low_resolution(plane: &[f32], h: usize, w: usize, side: usize) -> Vec<f32> {
    let span = |i: usize, n: usize| {
        let start = i * n / side;
        let end = ((i + 1) * n / side).max(start + 1);
        start..end
    };
    let mut coarse = vec![0.0f32; side * side];
    for i in 0..side {
        for j in 0..side {
            let (rows, cols) = (span(i, h), span(j, w));
            let count = (rows.len() * cols.len()) as f32;
            let sum: f32 = rows
                .flat_map(|r| cols.clone().map(move |c| (r, c)))
                .map(|(r, c)| plane[r * w + c])
                .sum();
            coarse[i * side + j] = sum / count;
        }
    }
    // Position of output pixel `p` of `n` on the coarse grid, as (lower cell, weight of the upper).
    let locate = |p: usize, n: usize| {
        let x = ((p as f32 + 0.5) * side as f32 / n as f32 - 0.5).clamp(0.0, (side - 1) as f32);
        let lo = (x.floor() as usize).min(side - 1);
        let hi = (lo + 1).min(side - 1);
        (lo, hi, x - lo as f32)
    };
    let mut out = vec![0.0f32; h * w];
    for r in 0..h {
        let (r0, r1, fr) = locate(r, h);
        for c in 0..w {
            let (c0, c1, fc) = locate(c, w);
            let top = coarse[r0 * side + c0] * (1.0 - fc) + coarse[r0 * side + c1] * fc;
            let bottom = coarse[r1 * side + c0] * (1.0 - fc) + coarse[r1 * side + c1] * fc;
            out[r * w + c] = top * (1.0 - fr) + bottom * fr;
        }
    }
    out
}

impl<S: SampleSource> SampleSource for LowResolution<S> {
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn load(&self, index: usize, rng: &mut StdRng) -> Result<Sample, DatasetError> {
        let mut sample = self.inner.load(index, rng)?;
        let (h, w) = (sample.height, sample.width);
        let mut pixels = Vec::with_capacity(sample.pixels.len());
        for plane in sample.pixels.chunks(h * w) {
            pixels.extend(low_resolution(plane, h, w, self.side));
        }
        sample.pixels = pixels;
        Ok(sample)
    }

    fn classes(&self) -> usize {
        self.inner.classes()
    }

    fn sample_shape(&self) -> [usize; 3] {
        self.inner.sample_shape()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_constant_image_stays_constant_and_a_grid_of_the_full_size_changes_nothing() {
        let plane = vec![0.25; 6 * 4];
        for side in 1..=4 {
            assert!(low_resolution(&plane, 6, 4, side)
                .iter()
                .all(|v| (v - 0.25).abs() < 1e-6));
        }
        let ramp: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(low_resolution(&ramp, 4, 4, 4), ramp);
    }

    #[test]
    fn blocks_are_averaged_and_interpolated_back() {
        // 4x4 with a 2x2 grid: block means 2.5, 4.5 / 10.5, 12.5 (rows of 0..16).
        let ramp: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let out = low_resolution(&ramp, 4, 4, 2);
        // Corners sit at the block centres' clamp: the block means themselves.
        assert_eq!(out[0], 2.5);
        assert_eq!(out[15], 12.5);
        // Pixel (1, 1) is a quarter of the way from block (0, 0) to the others.
        let expected = 2.5 * 0.75 * 0.75 + 4.5 * 0.75 * 0.25 + 10.5 * 0.25 * 0.75 + 12.5 / 16.0;
        assert!((out[5] - expected).abs() < 1e-5, "{} vs {expected}", out[5]);
        // The mean is kept.
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean(&out) - mean(&ramp)).abs() < 1e-5);
    }
}
