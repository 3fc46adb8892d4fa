//! A synthetic image classification set with learnable structure, needing no files.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Images `[n, 1, size, size]` whose class is the quadrant holding a bright square blob
/// (jittered), on Gaussian-ish background noise.
#[derive(Clone, Debug)]
pub struct SyntheticClassification {
    /// Pixel values, sample-major.
    pub images: Vec<f32>,
    /// Class of each sample, in 0..4.
    pub labels: Vec<i64>,
    /// Side of each square image.
    pub size: usize,
}

impl SyntheticClassification {
    /// Number of classes.
    pub const CLASSES: usize = 4;

    /// `n` samples of side `size` (at least 8), reproducible from `seed`.
    pub fn generate(n: usize, size: usize, noise: f32, seed: u64) -> Self {
        assert!(size >= 8, "synthetic images need a side of at least 8");
        let mut rng = StdRng::seed_from_u64(seed);
        let half = size / 2;
        let blob = (size / 4).max(2);
        let mut images = vec![0f32; n * size * size];
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let class = rng.random_range(0..Self::CLASSES);
            let img = &mut images[i * size * size..(i + 1) * size * size];
            for p in img.iter_mut() {
                *p = noise * (rng.random::<f32>() + rng.random::<f32>() - 1.0);
            }
            let r0 = (class / 2) * half + rng.random_range(0..=half - blob);
            let c0 = (class % 2) * half + rng.random_range(0..=half - blob);
            for r in r0..r0 + blob {
                for c in c0..c0 + blob {
                    img[r * size + c] += 1.0;
                }
            }
            labels.push(class as i64);
        }
        Self {
            images,
            labels,
            size,
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Samples `start..end` as tensors on `device`.
    pub fn batch<B: Backend>(
        &self,
        start: usize,
        end: usize,
        device: &B::Device,
    ) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
        let s = self.size;
        let x = TensorData::new(
            self.images[start * s * s..end * s * s].to_vec(),
            [end - start, 1, s, s],
        );
        let y = TensorData::new(self.labels[start..end].to_vec(), [end - start]);
        (
            Tensor::from_data(x.convert::<B::FloatElem>(), device),
            Tensor::from_data(y.convert::<B::IntElem>(), device),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_balanced() {
        let a = SyntheticClassification::generate(400, 12, 0.5, 3);
        let b = SyntheticClassification::generate(400, 12, 0.5, 3);
        assert_eq!(a.images, b.images);
        assert_eq!(a.labels, b.labels);
        for c in 0..4 {
            let count = a.labels.iter().filter(|&&l| l == c).count();
            assert!((60..140).contains(&count), "class {c}: {count}");
        }
        assert_ne!(
            a.images,
            SyntheticClassification::generate(400, 12, 0.5, 4).images
        );
    }

    #[test]
    fn the_label_is_the_brightest_quadrant() {
        // Without noise the blob's quadrant is recoverable exactly: the set is learnable.
        let d = SyntheticClassification::generate(50, 8, 0.0, 1);
        for i in 0..d.len() {
            let img = &d.images[i * 64..(i + 1) * 64];
            let quadrant = |q: usize| -> f32 {
                let (r0, c0) = ((q / 2) * 4, (q % 2) * 4);
                (r0..r0 + 4)
                    .flat_map(|r| (c0..c0 + 4).map(move |c| r * 8 + c))
                    .map(|p| img[p])
                    .sum()
            };
            let best = (0..4)
                .max_by(|&a, &b| quadrant(a).total_cmp(&quadrant(b)))
                .unwrap();
            assert_eq!(best as i64, d.labels[i]);
        }
    }
}
