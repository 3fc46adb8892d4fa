//! Epoch order, sharding and batching through Burn's `DataLoader`.
//!
//! The loader's background thread assembles each batch while the model trains on the last one;
//! inside a batch, samples are decoded in parallel (rayon) with per-sample RNGs, so batches are
//! identical whatever the thread timing: runs resume and shard reproducibly.

use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::Dataset;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

use crate::augment::Normalization;
use crate::error::DatasetError;
use crate::sample::{sample_rng, Sample, SampleSource, Target};

/// A reference to sample `index`, to be loaded with the RNG of `epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleRef {
    /// Index into the source.
    pub index: usize,
    /// Epoch (seeds the sample's augmentation).
    pub epoch: u64,
}

/// The samples one process visits in one epoch, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochOrder {
    refs: Vec<SampleRef>,
}

impl EpochOrder {
    /// All `len` samples, shuffled from `(seed, epoch)` when `shuffle`; with `drop_last` the
    /// incomplete last batch of `batch_size` is dropped.
    pub fn new(
        len: usize,
        batch_size: usize,
        seed: u64,
        epoch: u64,
        shuffle: bool,
        drop_last: bool,
    ) -> Self {
        Self::sharded(len, batch_size, seed, epoch, shuffle, drop_last, 0, 1)
    }

    /// This rank's share: the global order is cut into global batches of `batch_size`, and rank
    /// `rank` of `world` takes the `rank`-th of `world` equal parts of each (distinct samples,
    /// one global batch order from the seed). `batch_size` must be a multiple of `world`.
    #[allow(clippy::too_many_arguments)]
    pub fn sharded(
        len: usize,
        batch_size: usize,
        seed: u64,
        epoch: u64,
        shuffle: bool,
        drop_last: bool,
        rank: usize,
        world: usize,
    ) -> Self {
        let mut order: Vec<usize> = (0..len).collect();
        if shuffle {
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
                seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ));
        }
        let batch_size = batch_size.max(1);
        if drop_last {
            order.truncate(len / batch_size * batch_size);
        }
        let local = batch_size / world.max(1);
        let refs = order
            .chunks(batch_size)
            .flat_map(|global| {
                let per = global.len().div_ceil(world.max(1));
                let start = (rank * per).min(global.len());
                let end = ((rank + 1) * per).min(global.len());
                debug_assert!(global.len() < batch_size || end - start == local);
                global[start..end].to_vec()
            })
            .map(|index| SampleRef { index, epoch })
            .collect();
        Self { refs }
    }

    /// The order without its first `batches` batches of `batch_size` (to resume mid-epoch).
    pub fn skip_batches(mut self, batches: usize, batch_size: usize) -> Self {
        let n = (batches * batch_size).min(self.refs.len());
        self.refs.drain(..n);
        self
    }

    /// The sample references in order.
    pub fn refs(&self) -> &[SampleRef] {
        &self.refs
    }
}

impl Dataset<SampleRef> for EpochOrder {
    fn get(&self, index: usize) -> Option<SampleRef> {
        self.refs.get(index).copied()
    }

    fn len(&self) -> usize {
        self.refs.len()
    }
}

/// A batch of images with class labels or masks.
#[derive(Clone, Debug)]
pub struct Batch<B: Backend> {
    /// Normalised images `[n, c, h, w]`.
    pub images: Tensor<B, 4>,
    /// Class labels `[n]` (classification).
    pub labels: Option<Tensor<B, 1, Int>>,
    /// Masks `[n, 1, h, w]` of 0/1 (segmentation).
    pub masks: Option<Tensor<B, 4>>,
    /// Source index of each sample.
    pub indices: Vec<usize>,
}

/// Decodes, augments and normalises samples into a [`Batch`].
#[derive(Clone)]
pub struct SampleBatcher {
    source: Arc<dyn SampleSource>,
    normalization: Normalization,
    seed: u64,
}

impl SampleBatcher {
    /// Batches `source`'s samples, seeding augmentation from `seed`.
    pub fn new(source: Arc<dyn SampleSource>, normalization: Normalization, seed: u64) -> Self {
        Self {
            source,
            normalization,
            seed,
        }
    }

    /// Loads `refs` (in parallel) and stacks them on `device`.
    pub fn load<B: Backend>(
        &self,
        refs: &[SampleRef],
        device: &B::Device,
    ) -> Result<Batch<B>, DatasetError> {
        let samples: Vec<Sample> = refs
            .par_iter()
            .map(|r| {
                let mut rng = sample_rng(self.seed, r.epoch, r.index as u64);
                let mut s = self.source.load(r.index, &mut rng)?;
                self.normalization.apply(&mut s.pixels, s.channels);
                Ok(s)
            })
            .collect::<Result<_, DatasetError>>()?;
        stack(&samples, refs.iter().map(|r| r.index).collect(), device)
    }
}

/// Stacks samples of one shape into a batch.
pub fn stack<B: Backend>(
    samples: &[Sample],
    indices: Vec<usize>,
    device: &B::Device,
) -> Result<Batch<B>, DatasetError> {
    let first = samples
        .first()
        .ok_or_else(|| DatasetError::Invalid("cannot make an empty batch".into()))?;
    let [c, h, w] = first.shape();
    let n = samples.len();
    let mut pixels = Vec::with_capacity(n * c * h * w);
    let mut labels = Vec::new();
    let mut masks = Vec::new();
    for (s, &index) in samples.iter().zip(&indices) {
        if s.shape() != [c, h, w] {
            return Err(DatasetError::Invalid(format!(
                "sample {index} has shape {:?}, the batch {:?}",
                s.shape(),
                [c, h, w]
            )));
        }
        pixels.extend_from_slice(&s.pixels);
        match &s.target {
            Target::Class(label) => labels.push(*label as i64),
            Target::Mask(mask) => masks.extend_from_slice(mask),
        }
    }
    let images = Tensor::from_data(
        TensorData::new(pixels, [n, c, h, w]).convert::<B::FloatElem>(),
        device,
    );
    let labels = (labels.len() == n)
        .then(|| Tensor::from_data(TensorData::new(labels, [n]).convert::<B::IntElem>(), device));
    let masks = (masks.len() == n * h * w).then(|| {
        Tensor::from_data(
            TensorData::new(masks, [n, 1, h, w]).convert::<B::FloatElem>(),
            device,
        )
    });
    Ok(Batch {
        images,
        labels,
        masks,
        indices,
    })
}

impl<B: Backend> Batcher<B, SampleRef, Result<Batch<B>, DatasetError>> for SampleBatcher {
    fn batch(&self, items: Vec<SampleRef>, device: &B::Device) -> Result<Batch<B>, DatasetError> {
        self.load(&items, device)
    }
}

/// A loader over `order` in batches of `batch_size`, assembled one batch ahead on a worker thread.
pub fn loader<B: Backend>(
    batcher: SampleBatcher,
    order: EpochOrder,
    batch_size: usize,
    device: &B::Device,
) -> Arc<dyn DataLoader<B, Result<Batch<B>, DatasetError>>> {
    DataLoaderBuilder::new(batcher)
        .batch_size(batch_size)
        .num_workers(1)
        .set_device(device.clone())
        .build(order)
}
