//! What differs between classification and segmentation: the loss and the validation metric.

use std::collections::BTreeMap;

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use hylo_datasets::Batch;
use hylo_models::{Classifier, UNet};

use crate::data::VolumeOf;

/// Running sums of a metric over an epoch or a validation pass.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    /// Sum of per-batch mean losses times batch size.
    pub loss_sum: f64,
    /// Samples seen.
    pub samples: u64,
    /// Correct predictions (classification).
    pub correct: u64,
    /// Per volume: (2 |P ∩ Y|, |P| + |Y|) of thresholded masks (segmentation).
    pub dice: BTreeMap<String, (f64, f64)>,
}

impl Tally {
    /// Adds `other`'s sums to these.
    pub fn merge(&mut self, other: Tally) {
        self.loss_sum += other.loss_sum;
        self.samples += other.samples;
        self.correct += other.correct;
        for (key, (num, den)) in other.dice {
            let entry = self.dice.entry(key).or_insert((0.0, 0.0));
            entry.0 += num;
            entry.1 += den;
        }
    }

    /// Mean loss.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.samples.max(1) as f64
    }

    /// Accuracy (classification) or mean per-volume Dice (segmentation).
    pub fn score(&self) -> f64 {
        if self.dice.is_empty() {
            self.correct as f64 / self.samples.max(1) as f64
        } else {
            let per: Vec<f64> = self
                .dice
                .values()
                .map(|&(num, den)| if den == 0.0 { 1.0 } else { num / den })
                .collect();
            per.iter().sum::<f64>() / per.len() as f64
        }
    }
}

/// Per-batch metrics kept on the device until the training loop logs: reading them is one
/// blocking host read for all the batches since the last flush.
pub struct PendingTally<B: Backend> {
    values: Vec<Tensor<B, 1>>,
    parts: Vec<Part>,
    /// Where the batches of the open curvature period start in `parts` (`None`: no period
    /// open, every batch counts at once).
    period_from: Option<usize>,
    /// The open period's batches already read: they count once the period is kept, and are
    /// dropped with it when it is rejected (its updates were undone).
    period: Tally,
}

/// What one pending batch contributes.
enum Part {
    /// `[loss * n, correct]`.
    Class { samples: u64 },
    /// `[loss * n, intersection per sample (n), total per sample (n)]`.
    Dice { keys: Vec<String> },
}

impl<B: Backend> Default for PendingTally<B> {
    fn default() -> Self {
        Self {
            values: Vec::new(),
            parts: Vec::new(),
            period_from: None,
            period: Tally::default(),
        }
    }
}

impl<B: Backend> PendingTally<B> {
    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    fn push_class(&mut self, loss: Tensor<B, 1>, correct: Tensor<B, 1>, samples: usize) {
        self.values
            .push(Tensor::cat(vec![loss * samples as f64, correct], 0));
        self.parts.push(Part::Class {
            samples: samples as u64,
        });
    }

    fn push_dice(
        &mut self,
        loss: Tensor<B, 1>,
        intersection: Tensor<B, 1>,
        total: Tensor<B, 1>,
        keys: Vec<String>,
    ) {
        let n = keys.len() as f64;
        self.values
            .push(Tensor::cat(vec![loss * n, intersection, total], 0));
        self.parts.push(Part::Dice { keys });
    }

    /// Opens a curvature period after the batch just queued: what the open period holds counts
    /// in `tally` (it was kept), and the batches from here on wait for the new period's verdict.
    pub fn open_period(&mut self, tally: &mut Tally) {
        self.commit_period(tally);
        self.period_from = Some(self.parts.len());
    }

    /// Counts the open period's batches read so far in `tally` (an epoch ends, or a checkpoint
    /// is written); the period stays open for the batches still to come.
    pub fn commit_period(&mut self, tally: &mut Tally) {
        tally.merge(std::mem::take(&mut self.period));
    }

    /// Drops the batches of the open period (it was rejected: its updates were undone) and
    /// closes it.
    pub fn discard_period(&mut self) {
        if let Some(from) = self.period_from.take() {
            self.values.truncate(from);
            self.parts.truncate(from);
        }
        self.period = Tally::default();
    }

    /// Adds everything pending to `tally` (one blocking read) and empties the queue; the open
    /// period's batches go to its own tally until it is judged.
    pub fn flush(&mut self, tally: &mut Tally) {
        if self.parts.is_empty() {
            return;
        }
        let values = hylo_optim::host::read_f64(Tensor::cat(std::mem::take(&mut self.values), 0));
        let mut at = 0;
        let from = self.period_from.unwrap_or(usize::MAX);
        if self.period_from.is_some() {
            self.period_from = Some(0);
        }
        for (index, part) in std::mem::take(&mut self.parts).into_iter().enumerate() {
            let tally = if index >= from {
                &mut self.period
            } else {
                &mut *tally
            };
            match part {
                Part::Class { samples } => {
                    tally.loss_sum += values[at];
                    tally.correct += values[at + 1].round() as u64;
                    tally.samples += samples;
                    at += 2;
                }
                Part::Dice { keys } => {
                    let n = keys.len();
                    tally.loss_sum += values[at];
                    for (i, key) in keys.into_iter().enumerate() {
                        let entry = tally.dice.entry(key).or_insert((0.0, 0.0));
                        entry.0 += 2.0 * values[at + 1 + i];
                        entry.1 += values[at + 1 + n + i];
                    }
                    tally.samples += n as u64;
                    at += 1 + 2 * n;
                }
            }
        }
    }
}

/// A model the trainer can fit: its loss on a batch and its score on validation batches.
pub trait TrainModel<B: AutodiffBackend>: AutodiffModule<B> {
    /// Whether the score is a Dice coefficient (else an accuracy).
    const SEGMENTS: bool;

    /// Mean loss of the batch; the batch's loss and score counts are queued in `pending`.
    fn loss(&self, batch: Batch<B>, pending: &mut PendingTally<B::InnerBackend>) -> Tensor<B, 1>;

    /// The training loss of the batch alone (no tally).
    fn objective(&self, batch: Batch<B>) -> Tensor<B, 1>;

    /// Queues a validation batch's counts in `pending` (no autodiff).
    fn evaluate(
        model: &Self::InnerModule,
        batch: Batch<B::InnerBackend>,
        volume_of: Option<&VolumeOf>,
        pending: &mut PendingTally<B::InnerBackend>,
    );
}

fn classification_counts<B: Backend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    loss: Tensor<B, 1>,
    pending: &mut PendingTally<B>,
) {
    let n = labels.dims()[0];
    let correct = logits
        .argmax(1)
        .reshape([n])
        .equal(labels)
        .int()
        .sum()
        .float();
    pending.push_class(loss, correct, n);
}

fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, batch: &Batch<B>) -> Tensor<B, 1> {
    let labels = batch
        .labels
        .clone()
        .expect("classification batches carry labels");
    CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits, labels)
}

impl<B: AutodiffBackend> TrainModel<B> for Classifier<B> {
    const SEGMENTS: bool = false;

    fn objective(&self, batch: Batch<B>) -> Tensor<B, 1> {
        cross_entropy(self.forward(batch.images.clone()), &batch)
    }

    fn loss(&self, batch: Batch<B>, pending: &mut PendingTally<B::InnerBackend>) -> Tensor<B, 1> {
        let logits = self.forward(batch.images.clone());
        let loss = cross_entropy(logits.clone(), &batch);
        let labels = batch.labels.expect("classification batches carry labels");
        classification_counts(
            logits.inner(),
            labels.inner(),
            loss.clone().inner(),
            pending,
        );
        loss
    }

    fn evaluate(
        model: &Classifier<B::InnerBackend>,
        batch: Batch<B::InnerBackend>,
        _: Option<&VolumeOf>,
        pending: &mut PendingTally<B::InnerBackend>,
    ) {
        let logits = model.forward(batch.images.clone());
        let loss = cross_entropy(logits.clone(), &batch);
        let labels = batch.labels.expect("classification batches carry labels");
        classification_counts(logits, labels, loss, pending);
    }
}

/// Dice loss `1 - (2 Σ p y + 1) / (Σ p + Σ y + 1)` over the whole batch.
pub fn dice_loss<B: Backend>(probs: Tensor<B, 4>, masks: Tensor<B, 4>) -> Tensor<B, 1> {
    let intersection = (probs.clone() * masks.clone()).sum();
    let total = probs.sum() + masks.sum();
    (intersection * 2.0 + 1.0).div(total + 1.0).neg() + 1.0
}

fn dice_counts<B: Backend>(
    probs: Tensor<B, 4>,
    masks: Tensor<B, 4>,
    indices: &[usize],
    loss: Tensor<B, 1>,
    volume_of: Option<&VolumeOf>,
    pending: &mut PendingTally<B>,
) {
    let [n, _, h, w] = masks.dims();
    let predicted = probs.greater_elem(0.5).float().reshape([n, h * w]);
    let masks = masks.reshape([n, h * w]);
    let intersection = (predicted.clone() * masks.clone()).sum_dim(1).reshape([n]);
    let total = (predicted + masks).sum_dim(1).reshape([n]);
    let keys = indices
        .iter()
        .map(|&index| match volume_of {
            Some(f) => f(index),
            None => format!("{index:08}"),
        })
        .collect();
    pending.push_dice(loss, intersection, total, keys);
}

impl<B: AutodiffBackend> TrainModel<B> for UNet<B> {
    const SEGMENTS: bool = true;

    fn objective(&self, batch: Batch<B>) -> Tensor<B, 1> {
        let masks = batch
            .masks
            .clone()
            .expect("segmentation batches carry masks");
        dice_loss(self.forward(batch.images), masks)
    }

    fn loss(&self, batch: Batch<B>, pending: &mut PendingTally<B::InnerBackend>) -> Tensor<B, 1> {
        let probs = self.forward(batch.images.clone());
        let masks = batch
            .masks
            .clone()
            .expect("segmentation batches carry masks");
        let loss = dice_loss(probs.clone(), masks.clone());
        dice_counts(
            probs.inner(),
            masks.inner(),
            &batch.indices,
            loss.clone().inner(),
            None,
            pending,
        );
        loss
    }

    fn evaluate(
        model: &UNet<B::InnerBackend>,
        batch: Batch<B::InnerBackend>,
        volume_of: Option<&VolumeOf>,
        pending: &mut PendingTally<B::InnerBackend>,
    ) {
        let probs = model.forward(batch.images.clone());
        let masks = batch
            .masks
            .clone()
            .expect("segmentation batches carry masks");
        let loss = dice_loss(probs.clone(), masks.clone());
        dice_counts(probs, masks, &batch.indices, loss, volume_of, pending);
    }
}

/// "Precise BatchNorm": sets the running statistics of every BatchNorm layer of `model` to the
/// average of its batch statistics over `batches` at the current weights (forward passes with
/// `capture` off; no gradient, no step); the number of batches used.
pub fn recalibrate_statistics<B: AutodiffBackend, M: TrainModel<B>>(
    model: &M,
    batches: impl IntoIterator<Item = Result<Batch<B>, String>>,
    capture: &hylo_optim::CaptureHandle,
) -> Result<usize, String> {
    capture.without_capture(|| {
        let mut used = 0;
        for batch in batches {
            let batch = batch?;
            hylo_models::batch_norm::with_statistics_averaged(used as u64, || {
                model.objective(batch)
            });
            used += 1;
        }
        Ok(used)
    })
}

/// Loss and score of `model` on the validation set (one host read at the end); a sample that
/// cannot be read fails it with the file's name, unless the batcher skips such samples (then
/// each is logged through `log`).
pub fn validate<B: AutodiffBackend, M: TrainModel<B>>(
    data: &crate::data::DataSources,
    batcher: &hylo_datasets::SampleBatcher,
    model: &M,
    batch_size: usize,
    device: &B::Device,
    log: &impl Fn(&str),
) -> Result<Tally, String> {
    let valid = model.valid();
    let mut pending = PendingTally::default();
    let order = hylo_datasets::EpochOrder::new(data.val.len(), batch_size, 0, 0, false, false);
    for batch in
        hylo_datasets::loader::<B::InnerBackend>(batcher.clone(), order, batch_size, device).iter()
    {
        let batch = batch.map_err(|e| format!("validation: {e}"))?;
        for bad in &batch.skipped {
            log(&format!(
                "validation sample skipped (--skip-bad-samples): {bad}"
            ));
        }
        M::evaluate(&valid, batch, data.volume_of.as_ref(), &mut pending);
    }
    let mut tally = Tally::default();
    pending.flush(&mut tally);
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// Queues a batch of `samples` with mean loss `loss` and `correct` right answers.
    fn push(pending: &mut PendingTally<Flex>, loss: f32, correct: f32, samples: usize) {
        let device = Default::default();
        pending.push_class(
            Tensor::from_floats([loss], &device),
            Tensor::from_floats([correct], &device),
            samples,
        );
    }

    #[test]
    fn a_rejected_periods_batches_leave_the_tally_and_a_kept_ones_stay() {
        let mut pending = PendingTally::<Flex>::default();
        let mut tally = Tally::default();
        // No period open: every batch counts.
        push(&mut pending, 1.0, 3.0, 4);
        pending.flush(&mut tally);
        assert_eq!((tally.loss_sum, tally.samples, tally.correct), (4.0, 4, 3));
        // A period opens after batch 2; batches 3 and 4 (one read on the way) are its own.
        push(&mut pending, 2.0, 1.0, 4);
        pending.open_period(&mut tally);
        push(&mut pending, 1e30, 0.0, 4);
        pending.flush(&mut tally);
        assert_eq!((tally.loss_sum, tally.samples), (12.0, 8));
        push(&mut pending, 1e20, 0.0, 4);
        // Rejected: both go, the batch before the period stays.
        pending.discard_period();
        pending.flush(&mut tally);
        assert_eq!((tally.loss_sum, tally.samples, tally.correct), (12.0, 8, 4));
        // The next period is kept: opening the one after counts it.
        pending.open_period(&mut tally);
        push(&mut pending, 0.5, 4.0, 4);
        pending.flush(&mut tally);
        assert_eq!(tally.samples, 8);
        push(&mut pending, 0.25, 4.0, 4);
        pending.open_period(&mut tally);
        pending.flush(&mut tally);
        assert_eq!(
            (tally.loss_sum, tally.samples, tally.correct),
            (15.0, 16, 12)
        );
    }

    #[test]
    fn an_epoch_end_counts_the_open_periods_batches_read_so_far() {
        let mut pending = PendingTally::<Flex>::default();
        let mut tally = Tally::default();
        pending.open_period(&mut tally);
        push(&mut pending, 1.0, 2.0, 2);
        pending.flush(&mut tally);
        pending.commit_period(&mut tally);
        assert_eq!((tally.loss_sum, tally.samples, tally.correct), (2.0, 2, 2));
        // The next epoch's batches of the same period go with it if it is rejected.
        let mut next = Tally::default();
        push(&mut pending, 9.0, 0.0, 2);
        pending.flush(&mut next);
        pending.discard_period();
        pending.commit_period(&mut next);
        assert_eq!(next, Tally::default());
    }

    #[test]
    fn merged_tallies_add_every_sum_and_every_volumes_dice() {
        let mut a = Tally {
            loss_sum: 1.0,
            samples: 2,
            correct: 1,
            dice: BTreeMap::from([("v1".to_string(), (1.0, 2.0))]),
        };
        a.merge(Tally {
            loss_sum: 2.0,
            samples: 3,
            correct: 2,
            dice: BTreeMap::from([
                ("v1".to_string(), (0.5, 1.0)),
                ("v2".to_string(), (1.0, 1.0)),
            ]),
        });
        assert_eq!((a.loss_sum, a.samples, a.correct), (3.0, 5, 3));
        assert_eq!(a.dice["v1"], (1.5, 3.0));
        assert_eq!(a.dice["v2"], (1.0, 1.0));
    }
}
