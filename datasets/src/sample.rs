//! One decoded sample and the trait every dataset implements.

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::error::DatasetError;

/// What a sample is labelled with.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// A class index.
    Class(usize),
    /// A `height x width` mask of 0/1 values.
    Mask(Vec<f32>),
}

/// A decoded image `[channels, height, width]` (values in [0, 1] for real images) and its target.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Number of channels.
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// Pixels, channel-major (CHW).
    pub pixels: Vec<f32>,
    /// Label or mask.
    pub target: Target,
}

impl Sample {
    /// Shape `[channels, height, width]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }
}

/// A dataset whose samples can be loaded by index, in any order, from several threads.
pub trait SampleSource: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;

    /// True when there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sample `index`, decoded and augmented with `rng` (which is seeded per sample and epoch,
    /// so the result does not depend on thread scheduling).
    fn load(&self, index: usize, rng: &mut StdRng) -> Result<Sample, DatasetError>;

    /// Number of classes (1 for binary segmentation).
    fn classes(&self) -> usize;

    /// Shape `[channels, height, width]` of every sample this source yields.
    fn sample_shape(&self) -> [usize; 3];
}

/// A shared source is a source.
impl<S: SampleSource + ?Sized> SampleSource for std::sync::Arc<S> {
    fn len(&self) -> usize {
        (**self).len()
    }

    fn load(&self, index: usize, rng: &mut StdRng) -> Result<Sample, DatasetError> {
        (**self).load(index, rng)
    }

    fn classes(&self) -> usize {
        (**self).classes()
    }

    fn sample_shape(&self) -> [usize; 3] {
        (**self).sample_shape()
    }
}

/// The RNG of sample `index` in `epoch` for a run seeded with `seed` (SplitMix64 mixing).
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> StdRng {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(epoch.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(index.wrapping_mul(0x94D0_49BB_1331_11EB));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}
