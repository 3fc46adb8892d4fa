//! The synthetic classification set has learnable structure: a small CNN exceeds 90% on it.

use std::sync::Arc;

use burn::backend::{Autodiff, Flex};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use hylo_datasets::*;
use hylo_models::SmallCnnConfig;
use hylo_optim::CaptureHandle;

type B = Autodiff<Flex>;

#[test]
fn a_small_cnn_exceeds_90_percent_on_held_out_samples() {
    let device = Default::default();
    let train = SyntheticClassification::new(2048, 1, 12, 0);
    let val = SyntheticClassification::new(512, 1, 12, 99);
    let capture = CaptureHandle::new();
    let mut model = SmallCnnConfig::new(12, 4)
        .with_width(8)
        .init::<B>(&capture, &device);
    let mut optim = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
        .init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let batcher = SampleBatcher::new(Arc::new(train), Normalization::identity(1), 0);
    for epoch in 0..3 {
        let order = EpochOrder::new(2048, 64, 0, epoch, true, true);
        for batch in loader::<B>(batcher.clone(), order, 64, &device).iter() {
            let batch = batch.unwrap();
            let loss = loss_fn.forward(model.forward(batch.images), batch.labels.unwrap());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(0.05, model, grads);
        }
    }
    let val_batcher = SampleBatcher::new(Arc::new(val), Normalization::identity(1), 0);
    let order = EpochOrder::new(512, 512, 0, 0, false, false);
    let batch = val_batcher.load::<B>(order.refs(), &device).unwrap();
    let predicted = model.forward(batch.images).argmax(1).reshape([512]);
    let correct = predicted
        .equal(batch.labels.unwrap())
        .int()
        .sum()
        .into_scalar();
    let accuracy = correct as f64 / 512.0;
    assert!(accuracy > 0.9, "held-out accuracy {accuracy}");
}
