//! The default job: SGD, SNGD, K-FAC and HyLo train the same small CNN on the synthetic set.

use std::time::Instant;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{Optimizer, SgdConfig};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;
use hylo_datasets::synthetic::SyntheticClassification;
use hylo_models::{SmallCnn, SmallCnnConfig};
use hylo_optim::{
    CaptureHandle, CurvatureConfig, DampingConfig, HyloConfig, KfacConfig, NaturalGradient,
    SngdConfig, SwitchPolicy,
};

/// Settings of the demo.
#[derive(Clone, Debug)]
pub struct DemoArgs {
    /// Optimizer steps per method.
    pub steps: usize,
    /// Samples per batch.
    pub batch_size: usize,
    /// Training samples.
    pub train_samples: usize,
    /// Seed of data and weights.
    pub seed: u64,
}

/// One row of the result table.
#[derive(Clone, Debug)]
pub struct DemoResult {
    /// Optimizer name.
    pub optimizer: String,
    /// Mean training loss over the last epoch-sized window.
    pub final_loss: f64,
    /// Accuracy on the held-out set.
    pub val_accuracy: f64,
    /// Mean wall time per step, milliseconds.
    pub ms_per_step: f64,
    /// Steps until the running training accuracy first reached 90%.
    pub steps_to_90: Option<usize>,
}

enum AnyOptim<B: AutodiffBackend> {
    Sgd(burn::optim::adaptor::OptimizerAdaptor<burn::optim::Sgd<B::InnerBackend>, SmallCnn<B>, B>),
    Natural(Box<NaturalGradient<B>>),
}

/// Trains with every method and returns the table rows.
pub fn run<B: AutodiffBackend>(
    args: &DemoArgs,
    device: &B::Device,
) -> Result<Vec<DemoResult>, String> {
    let train = SyntheticClassification::generate(args.train_samples, 12, 0.8, args.seed);
    let val = SyntheticClassification::generate(512, 12, 0.8, args.seed + 1);
    let curvature = |freq: usize, damping: f64| {
        CurvatureConfig::new()
            .with_freq(freq)
            .with_weight_decay(1e-4)
            .with_damping(DampingConfig::new().with_initial(damping))
    };
    let err = |e: hylo_optim::error::ConfigError| e.to_string();
    let mut results = Vec::new();
    for name in ["sgd", "sngd", "kfac", "hylo"] {
        let capture = CaptureHandle::new();
        B::seed(device, args.seed);
        let model =
            SmallCnnConfig::new(12, SyntheticClassification::CLASSES).init::<B>(&capture, device);
        let (optim, lr) = match name {
            "sgd" => (
                AnyOptim::Sgd(
                    SgdConfig::new()
                        .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
                        .init(),
                ),
                0.05,
            ),
            "sngd" => (
                AnyOptim::Natural(Box::new(
                    SngdConfig::new()
                        .with_curvature(curvature(5, 0.3))
                        .init(&capture)
                        .map_err(err)?,
                )),
                0.1,
            ),
            "kfac" => (
                AnyOptim::Natural(Box::new(
                    KfacConfig::new()
                        .with_curvature(curvature(5, 0.3))
                        .with_inverse_every(5)
                        .init(&capture)
                        .map_err(err)?,
                )),
                0.1,
            ),
            _ => (
                AnyOptim::Natural(Box::new(
                    HyloConfig::new()
                        .with_curvature(curvature(5, 0.3))
                        .with_switch(SwitchPolicy::Auto { threshold: 0.2 })
                        .init(&capture)
                        .map_err(err)?,
                )),
                0.1,
            ),
        };
        results.push(train_one(
            name, model, optim, lr, &capture, &train, &val, args, device,
        ));
    }
    Ok(results)
}

#[allow(clippy::too_many_arguments)]
fn train_one<B: AutodiffBackend>(
    name: &str,
    mut model: SmallCnn<B>,
    mut optim: AnyOptim<B>,
    lr: f64,
    capture: &CaptureHandle,
    train: &SyntheticClassification,
    val: &SyntheticClassification,
    args: &DemoArgs,
    device: &B::Device,
) -> DemoResult {
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let batches = (train.len() / args.batch_size).max(1);
    let mut recent = Vec::new();
    let mut correct_window = Vec::new();
    let mut steps_to_90 = None;
    let start = Instant::now();
    for step in 0..args.steps {
        let b = step % batches;
        let (x, y) = train.batch::<B>(b * args.batch_size, (b + 1) * args.batch_size, device);
        let logits = model.forward(x);
        let correct: i64 = logits
            .clone()
            .argmax(1)
            .flatten::<1>(0, 1)
            .equal(y.clone())
            .int()
            .sum()
            .into_scalar()
            .elem();
        let loss = loss_fn.forward(logits, y);
        let loss_value: f64 = loss.clone().into_scalar().elem();
        let grads = capture.gradients(loss.backward(), &model);
        model = match &mut optim {
            AnyOptim::Sgd(o) => o.step(lr, model, grads),
            AnyOptim::Natural(o) => o.step(lr, model, grads),
        };
        recent.push(loss_value);
        correct_window.push(correct as f64 / args.batch_size as f64);
        let window = &correct_window[correct_window.len().saturating_sub(batches.min(10))..];
        if steps_to_90.is_none()
            && window.len() >= batches.min(10)
            && window.iter().sum::<f64>() / window.len() as f64 >= 0.9
        {
            steps_to_90 = Some(step + 1);
        }
        if let AnyOptim::Natural(o) = &optim {
            let r = o.last_report();
            tracing::debug!(name, step, loss = loss_value, mode = ?r.mode, damping = r.damping, "step");
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let tail = &recent[recent.len().saturating_sub(batches)..];
    let (x, y) = val.batch::<B>(0, val.len(), device);
    let pred = model.forward(x).argmax(1).flatten::<1>(0, 1);
    let correct: i64 = pred.equal(y).int().sum().into_scalar().elem();
    DemoResult {
        optimizer: name.to_string(),
        final_loss: tail.iter().sum::<f64>() / tail.len() as f64,
        val_accuracy: correct as f64 / val.len() as f64,
        ms_per_step: elapsed * 1e3 / args.steps as f64,
        steps_to_90,
    }
}

/// The results as a markdown table.
pub fn table(results: &[DemoResult]) -> String {
    let mut out = String::from("| optimizer | final train loss | val accuracy | steps to 90% train acc | ms/step |\n|---|---|---|---|---|\n");
    for r in results {
        out.push_str(&format!(
            "| {} | {:.4} | {:.1}% | {} | {:.1} |\n",
            r.optimizer,
            r.final_loss,
            100.0 * r.val_accuracy,
            r.steps_to_90.map_or("-".to_string(), |s| s.to_string()),
            r.ms_per_step
        ));
    }
    out
}
