//! Synthetic datasets that need no files: the defaults of the training binary.
//!
//! Samples are generated from `(seed, index)` alone, so any sample can be produced on any thread
//! in any order, and a dataset of a million samples costs no memory.

use rand::rngs::StdRng;
use rand::Rng;

use crate::error::DatasetError;
use crate::sample::{sample_rng, Sample, SampleSource, Target};

/// Classification: the class is the cell of a grid where a bright square blob sits (jittered,
/// of random colour), on uniform noise; a dimmer distractor blob sits elsewhere.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticClassification {
    /// Number of samples.
    pub len: usize,
    /// Channels of the images.
    pub channels: usize,
    /// Side of the square images (at least 8).
    pub size: usize,
    /// Number of classes (2 to 16): cells of a `ceil(sqrt(classes))` grid.
    pub classes: usize,
    /// Amplitude of the background noise.
    pub noise: f32,
    /// Seed; different seeds give different samples.
    pub seed: u64,
}

impl SyntheticClassification {
    /// A set of `len` samples with the given shape and 4 classes, noise 0.8.
    pub fn new(len: usize, channels: usize, size: usize, seed: u64) -> Self {
        Self {
            len,
            channels,
            size,
            classes: 4,
            noise: 0.8,
            seed,
        }
    }

    /// Checks the settings, naming the one that is wrong.
    pub fn validate(&self) -> Result<(), DatasetError> {
        let grid = self.grid();
        if !(2..=16).contains(&self.classes) {
            return Err(DatasetError::Invalid(format!(
                "synthetic classes must be in 2..=16, got {}",
                self.classes
            )));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(DatasetError::Invalid(format!(
                "synthetic noise must be a finite amplitude >= 0, got {}",
                self.noise
            )));
        }
        if self.size < 2 * grid.max(4) || self.channels == 0 {
            return Err(DatasetError::Invalid(format!(
                "synthetic images need at least 1 channel and a side of at least {} for {} \
                 classes, got {} channels and side {}",
                2 * grid.max(4),
                self.classes,
                self.channels,
                self.size
            )));
        }
        Ok(())
    }

    fn grid(&self) -> usize {
        (self.classes as f64).sqrt().ceil() as usize
    }

    fn blob(&self, img: &mut [f32], cell: usize, amplitude: f32, rng: &mut StdRng) {
        let (s, grid) = (self.size, self.grid());
        let cell_side = s / grid;
        let blob = (cell_side / 2).max(2);
        let r0 = (cell / grid) * cell_side + rng.random_range(0..=cell_side - blob);
        let c0 = (cell % grid) * cell_side + rng.random_range(0..=cell_side - blob);
        for c in 0..self.channels {
            let colour = amplitude * rng.random_range(0.6..=1.0);
            for r in r0..r0 + blob {
                for col in c0..c0 + blob {
                    img[c * s * s + r * s + col] += colour;
                }
            }
        }
    }
}

impl SampleSource for SyntheticClassification {
    fn len(&self) -> usize {
        self.len
    }

    fn load(&self, index: usize, _rng: &mut StdRng) -> Result<Sample, DatasetError> {
        self.validate()?;
        // The sample depends on (seed, index) only, never on the epoch.
        let mut rng = sample_rng(self.seed, u64::MAX, index as u64);
        let (c, s) = (self.channels, self.size);
        let class = rng.random_range(0..self.classes);
        let mut img: Vec<f32> = (0..c * s * s)
            .map(|_| self.noise * (rng.random::<f32>() + rng.random::<f32>() - 1.0))
            .collect();
        self.blob(&mut img, class, 1.0, &mut rng);
        let cells = self.grid() * self.grid();
        let distractor = (class + rng.random_range(1..cells)) % cells;
        self.blob(&mut img, distractor, 0.35, &mut rng);
        Ok(Sample {
            channels: c,
            height: s,
            width: s,
            pixels: img,
            target: Target::Class(class),
        })
    }

    fn classes(&self) -> usize {
        self.classes
    }

    fn sample_shape(&self) -> [usize; 3] {
        [self.channels, self.size, self.size]
    }
}

/// Segmentation: random discs (foreground, mask 1) and squares (background distractors) of
/// random colours on noise; the mask marks the discs.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticShapes {
    /// Number of samples.
    pub len: usize,
    /// Channels of the images.
    pub channels: usize,
    /// Side of the square images (at least 16).
    pub size: usize,
    /// Amplitude of the background noise.
    pub noise: f32,
    /// Seed.
    pub seed: u64,
}

impl SyntheticShapes {
    /// `len` RGB images of side `size`, noise 0.3.
    pub fn new(len: usize, size: usize, seed: u64) -> Self {
        Self {
            len,
            channels: 3,
            size,
            noise: 0.3,
            seed,
        }
    }
}

impl SampleSource for SyntheticShapes {
    fn len(&self) -> usize {
        self.len
    }

    fn load(&self, index: usize, _rng: &mut StdRng) -> Result<Sample, DatasetError> {
        if self.size < 16 || self.channels == 0 {
            return Err(DatasetError::Invalid(format!(
                "synthetic shapes need at least 1 channel and a side of at least 16, got {} and {}",
                self.channels, self.size
            )));
        }
        let mut rng = sample_rng(self.seed, u64::MAX, index as u64);
        let (c, s) = (self.channels, self.size);
        let mut img: Vec<f32> = (0..c * s * s)
            .map(|_| self.noise * (rng.random::<f32>() + rng.random::<f32>() - 1.0))
            .collect();
        let mut mask = vec![0.0f32; s * s];
        let shapes = rng.random_range(1..=4);
        for _ in 0..shapes {
            let disc = rng.random_bool(0.5);
            let radius = rng.random_range(s as f32 / 10.0..=s as f32 / 5.0);
            let cy = rng.random_range(0.0..s as f32);
            let cx = rng.random_range(0.0..s as f32);
            let colour: Vec<f32> = (0..c).map(|_| rng.random_range(0.5..=1.0)).collect();
            for y in 0..s {
                for x in 0..s {
                    let (dy, dx) = (y as f32 + 0.5 - cy, x as f32 + 0.5 - cx);
                    let inside = if disc {
                        dy * dy + dx * dx <= radius * radius
                    } else {
                        dy.abs() <= radius && dx.abs() <= radius
                    };
                    if inside {
                        for (ch, col) in colour.iter().enumerate() {
                            img[ch * s * s + y * s + x] = *col;
                        }
                        mask[y * s + x] = if disc { 1.0 } else { 0.0 };
                    }
                }
            }
        }
        Ok(Sample {
            channels: c,
            height: s,
            width: s,
            pixels: img,
            target: Target::Mask(mask),
        })
    }

    fn classes(&self) -> usize {
        1
    }

    fn sample_shape(&self) -> [usize; 3] {
        [self.channels, self.size, self.size]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(d: &SyntheticClassification, i: usize) -> usize {
        match d.load(i, &mut sample_rng(0, 0, 0)).unwrap().target {
            Target::Class(c) => c,
            Target::Mask(_) => unreachable!(),
        }
    }

    #[test]
    fn reproducible_balanced_and_seed_dependent() {
        let a = SyntheticClassification::new(400, 1, 12, 3);
        let mut rng = sample_rng(9, 9, 9);
        assert_eq!(
            a.load(5, &mut rng).unwrap(),
            a.load(5, &mut sample_rng(1, 2, 3)).unwrap()
        );
        for c in 0..4 {
            let count = (0..400).filter(|&i| label(&a, i) == c).count();
            assert!((60..140).contains(&count), "class {c}: {count}");
        }
        let b = SyntheticClassification::new(400, 1, 12, 4);
        assert_ne!(
            a.load(0, &mut rng).unwrap().pixels,
            b.load(0, &mut rng).unwrap().pixels
        );
        assert!(SyntheticClassification {
            classes: 1,
            ..a.clone()
        }
        .validate()
        .is_err());
        assert!(SyntheticClassification { size: 4, ..a }.validate().is_err());
    }

    #[test]
    fn the_label_is_the_brightest_cell_without_noise() {
        for classes in [4, 9] {
            let d = SyntheticClassification {
                noise: 0.0,
                classes,
                ..SyntheticClassification::new(60, 3, 12, 1)
            };
            let grid = d.grid();
            let cell = 12 / grid;
            for i in 0..d.len {
                let sample = d.load(i, &mut sample_rng(0, 0, 0)).unwrap();
                let energy = |q: usize| -> f32 {
                    let (r0, c0) = ((q / grid) * cell, (q % grid) * cell);
                    (r0..r0 + cell)
                        .flat_map(|r| (c0..c0 + cell).map(move |c| r * 12 + c))
                        .map(|p| sample.pixels[p] + sample.pixels[144 + p] + sample.pixels[288 + p])
                        .sum()
                };
                let best = (0..classes)
                    .max_by(|&a, &b| energy(a).total_cmp(&energy(b)))
                    .unwrap();
                assert_eq!(Target::Class(best), sample.target);
            }
        }
    }

    #[test]
    fn shapes_masks_are_binary_and_mark_discs() {
        let d = SyntheticShapes::new(20, 32, 5);
        let mut foreground = 0.0;
        for i in 0..20 {
            let sample = d.load(i, &mut sample_rng(0, 0, 0)).unwrap();
            assert_eq!(sample.shape(), [3, 32, 32]);
            let Target::Mask(mask) = sample.target else {
                panic!("no mask")
            };
            assert!(mask.iter().all(|&m| m == 0.0 || m == 1.0));
            foreground += mask.iter().sum::<f32>();
        }
        assert!(foreground > 0.0);
        assert!(SyntheticShapes::new(1, 8, 0)
            .load(0, &mut sample_rng(0, 0, 0))
            .is_err());
    }
}
