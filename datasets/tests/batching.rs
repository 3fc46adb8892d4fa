//! Epoch order, sharding, resume skipping and the Burn DataLoader path.

use std::sync::Arc;

use burn::backend::Flex;
use hylo_datasets::*;

fn batcher(seed: u64) -> SampleBatcher {
    let source = Augmented {
        inner: SyntheticClassification::new(50, 3, 12, 1),
        augment: RandomCropFlip::cifar(),
    };
    SampleBatcher::new(Arc::new(source), Normalization::identity(3), seed)
}

fn collect(order: EpochOrder, batch: usize) -> Vec<(Vec<usize>, Vec<f32>)> {
    loader::<Flex>(batcher(4), order, batch, &Default::default())
        .iter()
        .map(|b| {
            let b = b.unwrap();
            (b.indices, b.images.into_data().to_vec::<f32>().unwrap())
        })
        .collect()
}

#[test]
fn orders_are_seeded_permutations_with_drop_last() {
    let a = EpochOrder::new(50, 8, 1, 0, true, true);
    assert_eq!(a.refs().len(), 48);
    assert_eq!(a, EpochOrder::new(50, 8, 1, 0, true, true));
    assert_ne!(a, EpochOrder::new(50, 8, 1, 1, true, true));
    let full = EpochOrder::new(50, 8, 1, 0, true, false);
    let mut idx: Vec<usize> = full.refs().iter().map(|r| r.index).collect();
    idx.sort();
    assert_eq!(idx, (0..50).collect::<Vec<_>>());
    let plain = EpochOrder::new(5, 2, 1, 0, false, false);
    assert_eq!(
        plain.refs().iter().map(|r| r.index).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
}

#[test]
fn shards_split_every_global_batch() {
    let global = EpochOrder::new(40, 8, 3, 2, true, true);
    let r0 = EpochOrder::sharded(40, 8, 3, 2, true, true, 0, 2);
    let r1 = EpochOrder::sharded(40, 8, 3, 2, true, true, 1, 2);
    for b in 0..5 {
        let mut joined: Vec<_> = r0.refs()[b * 4..b * 4 + 4].to_vec();
        joined.extend_from_slice(&r1.refs()[b * 4..b * 4 + 4]);
        assert_eq!(joined, global.refs()[b * 8..b * 8 + 8].to_vec());
    }
}

#[test]
fn loader_batches_are_deterministic_and_resume_by_skipping() {
    let order = EpochOrder::new(50, 8, 1, 3, true, true);
    let first = collect(order.clone(), 8);
    assert_eq!(first.len(), 6);
    assert_eq!(first, collect(order.clone(), 8));
    assert_eq!(&first[2..], &collect(order.skip_batches(2, 8), 8)[..]);
    // Augmentation depends on the epoch.
    let other_epoch = collect(EpochOrder::new(50, 8, 1, 4, false, true), 8);
    let same_epoch = collect(EpochOrder::new(50, 8, 1, 3, false, true), 8);
    assert_ne!(other_epoch, same_epoch);
}

#[test]
fn segmentation_batches_carry_masks_and_errors_surface() {
    let shapes = SyntheticShapes::new(6, 16, 2);
    let b = SampleBatcher::new(Arc::new(shapes), Normalization::imagenet(), 0);
    let order = EpochOrder::new(6, 3, 0, 0, false, false);
    let batch = b
        .load::<Flex>(&order.refs()[..3], &Default::default())
        .unwrap();
    assert_eq!(batch.images.dims(), [3, 3, 16, 16]);
    assert_eq!(batch.masks.unwrap().dims(), [3, 1, 16, 16]);
    assert!(batch.labels.is_none());
    let bad = SampleBatcher::new(
        Arc::new(SyntheticShapes::new(2, 8, 0)),
        Normalization::identity(3),
        0,
    );
    assert!(bad.load::<Flex>(order.refs(), &Default::default()).is_err());
}

/// A source whose samples at `bad` cannot be read (as an undecodable image would).
struct Flaky {
    inner: SyntheticClassification,
    bad: Vec<usize>,
}

impl SampleSource for Flaky {
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn load(&self, index: usize, rng: &mut rand::rngs::StdRng) -> Result<Sample, DatasetError> {
        if self.bad.contains(&index) {
            return Err(DatasetError::format(
                format!("img/{index}.png"),
                "not a PNG file",
            ));
        }
        self.inner.load(index, rng)
    }

    fn classes(&self) -> usize {
        self.inner.classes()
    }

    fn sample_shape(&self) -> [usize; 3] {
        self.inner.sample_shape()
    }
}

#[test]
fn unreadable_samples_fail_the_batch_or_are_skipped_when_asked() {
    let flaky = |bad: Vec<usize>| {
        Arc::new(Flaky {
            inner: SyntheticClassification::new(8, 1, 8, 0),
            bad,
        })
    };
    let order = EpochOrder::new(8, 8, 0, 0, false, false);
    // By default: an error naming the file.
    let strict = SampleBatcher::new(flaky(vec![3]), Normalization::identity(1), 0);
    let err = strict.load_host(order.refs()).unwrap_err().to_string();
    assert!(
        err.contains("img/3.png") && err.contains("not a PNG"),
        "{err}"
    );
    // Asked to skip: the batch holds the others and names the one left out.
    let lenient =
        SampleBatcher::new(flaky(vec![3, 5]), Normalization::identity(1), 0).skip_bad(true);
    let batch = lenient.load_host(order.refs()).unwrap();
    assert_eq!(batch.indices, vec![0, 1, 2, 4, 6, 7]);
    assert_eq!(batch.shape[0], 6);
    assert_eq!(batch.skipped.len(), 2);
    assert!(batch.skipped[1].to_string().contains("img/5.png"));
    // The same batch through the loader on a device.
    let loaded: Vec<_> = loader::<Flex>(lenient, order.clone(), 8, &Default::default())
        .iter()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(loaded[0].images.dims()[0], 6);
    assert_eq!(loaded[0].skipped.len(), 2);
    // Every sample unreadable: an error even when skipping.
    let hopeless =
        SampleBatcher::new(flaky((0..8).collect()), Normalization::identity(1), 0).skip_bad(true);
    let err = hopeless.load_host(order.refs()).unwrap_err().to_string();
    assert!(err.contains("every sample of a batch of 8 failed"), "{err}");
}
