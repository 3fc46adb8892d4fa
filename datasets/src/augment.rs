//! Augmentation (random crop with padding, flips, random-resized crops) and normalisation.

use image::imageops::FilterType;
use image::DynamicImage;
use rand::rngs::StdRng;
use rand::Rng;

use crate::error::DatasetError;
use crate::sample::{Sample, SampleSource, Target};

/// Per-channel mean and standard deviation subtracted and divided in the batcher.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalization {
    /// Mean of each channel.
    pub mean: Vec<f32>,
    /// Standard deviation of each channel.
    pub std: Vec<f32>,
}

impl Normalization {
    /// CIFAR-10 (the HyLo code's constants).
    pub fn cifar10() -> Self {
        Self::new(&[0.4914, 0.4822, 0.4465], &[0.2023, 0.1994, 0.2010])
    }

    /// CIFAR-100.
    pub fn cifar100() -> Self {
        Self::new(&[0.5071, 0.4865, 0.4409], &[0.2673, 0.2564, 0.2762])
    }

    /// MNIST.
    pub fn mnist() -> Self {
        Self::new(&[0.1307], &[0.3081])
    }

    /// Fashion-MNIST.
    pub fn fashion_mnist() -> Self {
        Self::new(&[0.2860], &[0.3530])
    }

    /// ImageNet (torchvision's constants; also used for the LGG MRI slices).
    pub fn imagenet() -> Self {
        Self::new(&[0.485, 0.456, 0.406], &[0.229, 0.224, 0.225])
    }

    /// No change, for `channels` channels.
    pub fn identity(channels: usize) -> Self {
        Self {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        }
    }

    /// Pixels of `[0, 1]` scaled to their byte values 0-255 (inputs left unnormalised).
    pub fn pixel_values(channels: usize) -> Self {
        Self {
            mean: vec![0.0; channels],
            std: vec![1.0 / 255.0; channels],
        }
    }

    fn new(mean: &[f32], std: &[f32]) -> Self {
        Self {
            mean: mean.to_vec(),
            std: std.to_vec(),
        }
    }

    /// Normalises CHW `pixels` of `channels` channels in place.
    pub fn apply(&self, pixels: &mut [f32], channels: usize) {
        let plane = pixels.len() / channels.max(1);
        for c in 0..channels {
            let (m, s) = (self.mean[c % self.mean.len()], self.std[c % self.std.len()]);
            for p in &mut pixels[c * plane..(c + 1) * plane] {
                *p = (*p - m) / s;
            }
        }
    }
}

/// Random crop of the original size from the zero-padded image, then a random horizontal flip
/// (CIFAR's augmentation with `padding = 4`). Masks are cropped and flipped alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RandomCropFlip {
    /// Zero padding on each side before cropping (0: no crop).
    pub padding: usize,
    /// Flip horizontally with probability 1/2.
    pub flip: bool,
}

impl RandomCropFlip {
    /// CIFAR's augmentation: padding 4 and flips.
    pub fn cifar() -> Self {
        Self {
            padding: 4,
            flip: true,
        }
    }

    /// Applies the crop and flip to `sample` in place.
    pub fn apply(&self, sample: &mut Sample, rng: &mut StdRng) {
        let (h, w) = (sample.height, sample.width);
        let p = self.padding;
        let (dy, dx) = if p > 0 {
            (rng.random_range(0..=2 * p), rng.random_range(0..=2 * p))
        } else {
            (p, p)
        };
        let flip = self.flip && rng.random_bool(0.5);
        let transform = |plane: &[f32], out: &mut [f32]| {
            for y in 0..h {
                for x in 0..w {
                    // Output (y, x) reads padded (y + dy, x' + dx), i.e. original minus p.
                    let xs = if flip { w - 1 - x } else { x };
                    let (sy, sx) = (y + dy, xs + dx);
                    out[y * w + x] = if sy >= p && sy < h + p && sx >= p && sx < w + p {
                        plane[(sy - p) * w + (sx - p)]
                    } else {
                        0.0
                    };
                }
            }
        };
        let mut out = vec![0.0; sample.pixels.len()];
        for c in 0..sample.channels {
            let range = c * h * w..(c + 1) * h * w;
            transform(&sample.pixels[range.clone()], &mut out[range]);
        }
        sample.pixels = out;
        if let Target::Mask(mask) = &mut sample.target {
            let mut out = vec![0.0; mask.len()];
            transform(mask, &mut out);
            *mask = out;
        }
    }
}

/// A source whose samples pass through [`RandomCropFlip`].
pub struct Augmented<S> {
    /// The wrapped source.
    pub inner: S,
    /// The augmentation.
    pub augment: RandomCropFlip,
}

impl<S: SampleSource> SampleSource for Augmented<S> {
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn load(&self, index: usize, rng: &mut StdRng) -> Result<Sample, DatasetError> {
        let mut sample = self.inner.load(index, rng)?;
        self.augment.apply(&mut sample, rng);
        Ok(sample)
    }

    fn classes(&self) -> usize {
        self.inner.classes()
    }

    fn sample_shape(&self) -> [usize; 3] {
        self.inner.sample_shape()
    }
}

/// A source whose images are zero-padded, centered, to `size x size` (MNIST's 28x28 digits at
/// the 32x32 of LeNet and the CIFAR ResNets).
pub struct ZeroPadded<S> {
    /// The wrapped source.
    pub inner: S,
    /// Side of the padded images (at least the source's height and width).
    pub size: usize,
}

impl<S: SampleSource> ZeroPadded<S> {
    /// Pads `inner`'s images to `size`, or an error when they are larger.
    pub fn new(inner: S, size: usize) -> Result<Self, DatasetError> {
        let [_, h, w] = inner.sample_shape();
        if size < h || size < w {
            return Err(DatasetError::Invalid(format!(
                "images of {h}x{w} cannot be padded to {size}x{size}: give a size of at least \
                 {}",
                h.max(w)
            )));
        }
        Ok(Self { inner, size })
    }
}

impl<S: SampleSource> SampleSource for ZeroPadded<S> {
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn load(&self, index: usize, rng: &mut StdRng) -> Result<Sample, DatasetError> {
        let sample = self.inner.load(index, rng)?;
        let (h, w, n) = (sample.height, sample.width, self.size);
        let (top, left) = ((n - h) / 2, (n - w) / 2);
        let mut pixels = vec![0.0; sample.channels * n * n];
        for c in 0..sample.channels {
            for r in 0..h {
                let from = (c * h + r) * w;
                let to = (c * n + top + r) * n + left;
                pixels[to..to + w].copy_from_slice(&sample.pixels[from..from + w]);
            }
        }
        Ok(Sample {
            height: n,
            width: n,
            pixels,
            ..sample
        })
    }

    fn classes(&self) -> usize {
        self.inner.classes()
    }

    fn sample_shape(&self) -> [usize; 3] {
        [self.inner.sample_shape()[0], self.size, self.size]
    }
}

/// Inception-style crop: a random area in `[0.08, 1]` of the image and aspect ratio in
/// `[3/4, 4/3]` (log-uniform), resized to `size x size`; falls back to a center crop.
pub fn random_resized_crop(img: &DynamicImage, size: u32, rng: &mut StdRng) -> DynamicImage {
    let (w, h) = (img.width(), img.height());
    let area = (w * h) as f64;
    for _ in 0..10 {
        let target = area * rng.random_range(0.08..=1.0);
        let log_ratio = rng.random_range((3.0f64 / 4.0).ln()..=(4.0f64 / 3.0).ln());
        let ratio = log_ratio.exp();
        let cw = (target * ratio).sqrt().round() as u32;
        let ch = (target / ratio).sqrt().round() as u32;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let x = rng.random_range(0..=w - cw);
            let y = rng.random_range(0..=h - ch);
            return img
                .crop_imm(x, y, cw, ch)
                .resize_exact(size, size, FilterType::Triangle);
        }
    }
    let side = w.min(h);
    img.crop_imm((w - side) / 2, (h - side) / 2, side, side)
        .resize_exact(size, size, FilterType::Triangle)
}

/// Resizes the shorter side to `resize` and takes the central `crop x crop` square.
pub fn resize_center_crop(img: &DynamicImage, resize: u32, crop: u32) -> DynamicImage {
    let (w, h) = (img.width().max(1), img.height().max(1));
    let (nw, nh) = if w <= h {
        (
            resize,
            ((h as u64 * resize as u64) / w as u64).max(1) as u32,
        )
    } else {
        (
            ((w as u64 * resize as u64) / h as u64).max(1) as u32,
            resize,
        )
    };
    let resized = img.resize_exact(nw, nh, FilterType::Triangle);
    let crop = crop.min(nw).min(nh);
    resized.crop_imm((nw - crop) / 2, (nh - crop) / 2, crop, crop)
}

/// CHW floats in [0, 1] of an RGB image.
pub fn rgb_to_chw(img: &DynamicImage) -> Vec<f32> {
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut out = vec![0.0; 3 * h * w];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * h * w + i] = px[c] as f32 / 255.0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::sample_rng;

    fn ramp(c: usize, h: usize, w: usize) -> Sample {
        Sample {
            channels: c,
            height: h,
            width: w,
            pixels: (0..c * h * w).map(|v| v as f32 + 1.0).collect(),
            target: Target::Mask((0..h * w).map(|v| v as f32 + 1.0).collect()),
        }
    }

    #[test]
    fn crop_is_a_shift_with_zero_fill_and_flip_mirrors() {
        for seed in 0..50 {
            let mut s = ramp(2, 5, 6);
            let orig = s.clone();
            RandomCropFlip {
                padding: 2,
                flip: true,
            }
            .apply(&mut s, &mut sample_rng(seed, 0, 0));
            // Every nonzero output pixel is an input pixel of the same channel; rows stay rows.
            for c in 0..2 {
                for y in 0..5 {
                    let row: Vec<f32> = s.pixels[c * 30 + y * 6..c * 30 + y * 6 + 6].to_vec();
                    for v in row.iter().filter(|v| **v != 0.0) {
                        let idx = *v as usize - 1;
                        assert_eq!(idx / 30, c);
                    }
                }
            }
            let Target::Mask(mask) = &s.target else {
                unreachable!()
            };
            assert_eq!(&s.pixels[..30], &mask[..]);
            assert_eq!(s.shape(), orig.shape());
        }
        let mut s = ramp(1, 2, 3);
        RandomCropFlip {
            padding: 0,
            flip: false,
        }
        .apply(&mut s, &mut sample_rng(0, 0, 0));
        assert_eq!(s.pixels, ramp(1, 2, 3).pixels);
    }

    #[test]
    fn crop_and_flip_are_seeded_and_vary() {
        let aug = RandomCropFlip::cifar();
        let run = |seed| {
            let mut s = ramp(3, 8, 8);
            aug.apply(&mut s, &mut sample_rng(seed, 1, 2));
            s.pixels
        };
        assert_eq!(run(7), run(7));
        let distinct: std::collections::HashSet<Vec<u32>> = (0..20)
            .map(|s| run(s).iter().map(|v| v.to_bits()).collect())
            .collect();
        assert!(distinct.len() > 10);
    }

    #[test]
    fn normalisation_and_image_crops() {
        let mut px = vec![0.5, 0.5, 1.0, 1.0];
        Normalization::new(&[0.5, 0.0], &[1.0, 2.0]).apply(&mut px, 2);
        assert_eq!(px, vec![0.0, 0.0, 0.5, 0.5]);
        let img = DynamicImage::new_rgb8(300, 200);
        let v = resize_center_crop(&img, 256, 224);
        assert_eq!((v.width(), v.height()), (224, 224));
        let t = random_resized_crop(&img, 64, &mut sample_rng(1, 2, 3));
        assert_eq!((t.width(), t.height()), (64, 64));
        assert_eq!(rgb_to_chw(&t).len(), 3 * 64 * 64);
    }
}
