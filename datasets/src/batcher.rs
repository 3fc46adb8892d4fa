//! Epoch order, sharding and batching through Burn's `DataLoader`.
//!
//! The loader's background thread assembles each batch on the host while the model trains on the
//! last one; the batch becomes device tensors on the thread that iterates the loader (tensors
//! created on one thread and used on another race in Burn 0.21's GPU backends: a batch's memory
//! can be reused while the other thread's kernels still read it). Inside a batch, samples are
//! decoded in parallel (rayon) with per-sample RNGs, so batches are identical whatever the thread
//! timing: runs resume and shard reproducibly.

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
    /// Samples left out because they could not be read (with [`SampleBatcher::skip_bad`]).
    pub skipped: Vec<DatasetError>,
}

/// Decodes, augments and normalises samples into a [`Batch`].
#[derive(Clone)]
pub struct SampleBatcher {
    source: Arc<dyn SampleSource>,
    normalization: Normalization,
    seed: u64,
    skip_bad: bool,
}

impl SampleBatcher {
    /// Batches `source`'s samples, seeding augmentation from `seed`.
    pub fn new(source: Arc<dyn SampleSource>, normalization: Normalization, seed: u64) -> Self {
        Self {
            source,
            normalization,
            seed,
            skip_bad: false,
        }
    }

    /// What happens to a sample that cannot be read (an undecodable image, a missing mask): by
    /// default the batch fails with an error naming the file; with `skip` the sample is left
    /// out and reported in the batch's `skipped` list (a batch whose every sample fails is still
    /// an error).
    pub fn skip_bad(mut self, skip: bool) -> Self {
        self.skip_bad = skip;
        self
    }

    /// Loads `refs` (in parallel) and stacks them on `device`.
    pub fn load<B: Backend>(
        &self,
        refs: &[SampleRef],
        device: &B::Device,
    ) -> Result<Batch<B>, DatasetError> {
        Ok(self.load_host(refs)?.to_device(device))
    }

    /// Loads `refs` (in parallel) and stacks them on the host.
    pub fn load_host(&self, refs: &[SampleRef]) -> Result<HostBatch, DatasetError> {
        let loaded: Vec<Result<Sample, DatasetError>> = refs
            .par_iter()
            .map(|r| {
                let mut rng = sample_rng(self.seed, r.epoch, r.index as u64);
                let mut s = self.source.load(r.index, &mut rng)?;
                self.normalization.apply(&mut s.pixels, s.channels);
                Ok(s)
            })
            .collect();
        let mut samples = Vec::with_capacity(refs.len());
        let mut indices = Vec::with_capacity(refs.len());
        let mut skipped = Vec::new();
        for (r, sample) in refs.iter().zip(loaded) {
            match sample {
                Ok(s) => {
                    samples.push(s);
                    indices.push(r.index);
                }
                Err(e) if self.skip_bad => skipped.push(e),
                Err(e) => return Err(e),
            }
        }
        if samples.is_empty() {
            if let Some(first) = skipped.first() {
                return Err(DatasetError::Invalid(format!(
                    "every sample of a batch of {} failed to load; the first: {first}",
                    refs.len()
                )));
            }
        }
        let mut batch = HostBatch::stack(&samples, indices)?;
        batch.skipped = skipped;
        Ok(batch)
    }
}

/// A batch assembled on the host, not yet on a device.
#[derive(Clone, Debug)]
pub struct HostBatch {
    /// `[n, c, h, w]`.
    pub shape: [usize; 4],
    /// Normalised pixels, sample-major.
    pub pixels: Vec<f32>,
    /// Class labels (classification), one per sample.
    pub labels: Option<Vec<i64>>,
    /// Masks of 0/1, `[n, 1, h, w]` (segmentation).
    pub masks: Option<Vec<f32>>,
    /// Source index of each sample.
    pub indices: Vec<usize>,
    /// Samples left out because they could not be read.
    pub skipped: Vec<DatasetError>,
}

impl HostBatch {
    /// Stacks samples of one shape.
    pub fn stack(samples: &[Sample], indices: Vec<usize>) -> Result<Self, DatasetError> {
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
        Ok(Self {
            shape: [n, c, h, w],
            pixels,
            labels: (labels.len() == n).then_some(labels),
            masks: (masks.len() == n * h * w).then_some(masks),
            indices,
            skipped: Vec::new(),
        })
    }

    /// The batch as tensors on `device` (call it on the thread that uses them).
    pub fn to_device<B: Backend>(self, device: &B::Device) -> Batch<B> {
        let [n, _, h, w] = self.shape;
        let float = |values: Vec<f32>, shape: [usize; 4]| {
            Tensor::from_data(
                TensorData::new(values, shape).convert::<B::FloatElem>(),
                device,
            )
        };
        Batch {
            images: float(self.pixels, self.shape),
            labels: self.labels.map(|labels| {
                Tensor::from_data(TensorData::new(labels, [n]).convert::<B::IntElem>(), device)
            }),
            masks: self.masks.map(|masks| float(masks, [n, 1, h, w])),
            indices: self.indices,
            skipped: self.skipped,
        }
    }
}

/// Stacks samples of one shape into a batch on `device`.
pub fn stack<B: Backend>(
    samples: &[Sample],
    indices: Vec<usize>,
    device: &B::Device,
) -> Result<Batch<B>, DatasetError> {
    Ok(HostBatch::stack(samples, indices)?.to_device(device))
}

impl<B: Backend> Batcher<B, SampleRef, Result<HostBatch, DatasetError>> for SampleBatcher {
    fn batch(&self, items: Vec<SampleRef>, _device: &B::Device) -> Result<HostBatch, DatasetError> {
        self.load_host(&items)
    }
}

/// Batches of `order` in batches of `batch_size` on `device`: assembled one batch ahead on a
/// worker thread (on the host), moved to the device by the thread that iterates.
pub struct BatchLoader<B: Backend> {
    inner: Arc<dyn DataLoader<B, Result<HostBatch, DatasetError>>>,
    device: B::Device,
}

impl<B: Backend> BatchLoader<B> {
    /// The batches in order, each moved to the device as it is taken.
    pub fn iter(&self) -> impl Iterator<Item = Result<Batch<B>, DatasetError>> + '_ {
        self.inner
            .iter()
            .map(|batch| batch.map(|b| b.to_device(&self.device)))
    }
}

/// A loader over `order` in batches of `batch_size`, assembled one batch ahead on a worker thread.
pub fn loader<B: Backend>(
    batcher: SampleBatcher,
    order: EpochOrder,
    batch_size: usize,
    device: &B::Device,
) -> BatchLoader<B> {
    let inner = DataLoaderBuilder::new(batcher)
        .batch_size(batch_size)
        .num_workers(1)
        .set_device(device.clone())
        .build(order);
    BatchLoader {
        inner,
        device: device.clone(),
    }
}
