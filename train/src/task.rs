//! What differs between classification and segmentation: the loss and the validation metric.

use std::collections::BTreeMap;

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
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

/// A model the trainer can fit: its loss on a batch and its score on validation batches.
pub trait TrainModel<B: AutodiffBackend>: AutodiffModule<B> {
    /// Whether the score is a Dice coefficient (else an accuracy).
    const SEGMENTS: bool;

    /// Mean loss of the batch; `tally` gets the batch's loss and score counts.
    fn loss(&self, batch: Batch<B>, tally: &mut Tally) -> Tensor<B, 1>;

    /// Adds a validation batch to `tally` (no autodiff).
    fn evaluate(
        model: &Self::InnerModule,
        batch: Batch<B::InnerBackend>,
        volume_of: Option<&VolumeOf>,
        tally: &mut Tally,
    );
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem::<f64>()
}

fn classification_tally<B: Backend>(
    logits: Tensor<B, 2>,
    batch: &Batch<B>,
    loss: f64,
    tally: &mut Tally,
) -> Option<()> {
    let labels = batch.labels.clone()?;
    let n = labels.dims()[0];
    let correct = logits.argmax(1).reshape([n]).equal(labels).int().sum();
    tally.correct += correct.into_scalar().elem::<i64>() as u64;
    tally.samples += n as u64;
    tally.loss_sum += loss * n as f64;
    Some(())
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

    fn loss(&self, batch: Batch<B>, tally: &mut Tally) -> Tensor<B, 1> {
        let logits = self.forward(batch.images.clone());
        let loss = cross_entropy(logits.clone(), &batch);
        let value = scalar(loss.clone().detach());
        classification_tally(logits.detach(), &batch, value, tally);
        loss
    }

    fn evaluate(
        model: &Classifier<B::InnerBackend>,
        batch: Batch<B::InnerBackend>,
        _: Option<&VolumeOf>,
        tally: &mut Tally,
    ) {
        let logits = model.forward(batch.images.clone());
        let loss = scalar(cross_entropy(logits.clone(), &batch));
        classification_tally(logits, &batch, loss, tally);
    }
}

/// Dice loss `1 - (2 Σ p y + 1) / (Σ p + Σ y + 1)` over the whole batch.
pub fn dice_loss<B: Backend>(probs: Tensor<B, 4>, masks: Tensor<B, 4>) -> Tensor<B, 1> {
    let intersection = (probs.clone() * masks.clone()).sum();
    let total = probs.sum() + masks.sum();
    (intersection * 2.0 + 1.0).div(total + 1.0).neg() + 1.0
}

fn dice_tally<B: Backend>(
    probs: Tensor<B, 4>,
    batch: &Batch<B>,
    loss: f64,
    volume_of: Option<&VolumeOf>,
    tally: &mut Tally,
) {
    let masks = batch
        .masks
        .clone()
        .expect("segmentation batches carry masks");
    let [n, _, h, w] = masks.dims();
    let predicted = probs.greater_elem(0.5).float().reshape([n, h * w]);
    let masks = masks.reshape([n, h * w]);
    let inter: Vec<f64> = (predicted.clone() * masks.clone())
        .sum_dim(1)
        .into_data()
        .convert::<f64>()
        .to_vec()
        .unwrap();
    let total: Vec<f64> = (predicted + masks)
        .sum_dim(1)
        .into_data()
        .convert::<f64>()
        .to_vec()
        .unwrap();
    for (i, &index) in batch.indices.iter().enumerate() {
        let key = match volume_of {
            Some(f) => f(index),
            None => format!("{index:08}"),
        };
        let entry = tally.dice.entry(key).or_insert((0.0, 0.0));
        entry.0 += 2.0 * inter[i];
        entry.1 += total[i];
    }
    tally.samples += n as u64;
    tally.loss_sum += loss * n as f64;
}

impl<B: AutodiffBackend> TrainModel<B> for UNet<B> {
    const SEGMENTS: bool = true;

    fn loss(&self, batch: Batch<B>, tally: &mut Tally) -> Tensor<B, 1> {
        let probs = self.forward(batch.images.clone());
        let masks = batch
            .masks
            .clone()
            .expect("segmentation batches carry masks");
        let loss = dice_loss(probs.clone(), masks);
        let value = scalar(loss.clone().detach());
        dice_tally(probs.detach(), &batch, value, None, tally);
        loss
    }

    fn evaluate(
        model: &UNet<B::InnerBackend>,
        batch: Batch<B::InnerBackend>,
        volume_of: Option<&VolumeOf>,
        tally: &mut Tally,
    ) {
        let probs = model.forward(batch.images.clone());
        let masks = batch
            .masks
            .clone()
            .expect("segmentation batches carry masks");
        let loss = scalar(dice_loss(probs.clone(), masks));
        dice_tally(probs, &batch, loss, volume_of, tally);
    }
}
