//! Whole training steps of ResNet-32 per optimizer, and data-loading throughput.

use std::sync::Arc;
use std::time::Instant;

use burn::backend::Flex;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Int, Tensor};
use hylo_datasets::cifar::encode_cifar;
use hylo_datasets::*;
use hylo_models::{CifarResNet, CifarResNetConfig};
use hylo_optim::{
    CaptureHandle, CurvatureConfig, DampingConfig, HyloConfig, KfacConfig, SngdConfig,
};
use serde::{Deserialize, Serialize};

/// Step times of one optimizer over one refresh period.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepTiming {
    /// Optimizer.
    pub optimizer: String,
    /// Seconds of a step that refreshes the curvature.
    pub refresh_step: f64,
    /// Mean seconds of a step that reuses it.
    pub plain_step: f64,
    /// Mean seconds per step amortised over the refresh period.
    pub amortised: f64,
    /// Blocking device-to-host reads of the whole step that refreshes (forward, backward and the
    /// optimizer; `hylo_optim::host`).
    pub reads_refresh_step: u64,
    /// Blocking device-to-host reads of each other whole step (the most of any of them).
    pub reads_plain_step: u64,
}

/// Times `freq + 1` steps (5 for SGD) of ResNet-32 on CIFAR-shaped batches of `batch` with each optimizer
/// (curvature refreshed every `freq` steps, as in the paper's run with freq 13).
///
/// `progress` is advanced once per step (`5 + 3 (freq + 1)` in all).
pub fn resnet32_steps<B: AutodiffBackend>(
    batch: usize,
    freq: usize,
    device: &B::Device,
    progress: &indicatif::ProgressBar,
) -> Vec<StepTiming> {
    let x = Tensor::<B, 4>::random([batch, 3, 32, 32], Distribution::Normal(0.0, 1.0), device);
    let y = Tensor::<B, 1, Int>::from_data(
        burn::tensor::TensorData::new(
            (0..batch as i64).map(|i| i % 10).collect::<Vec<_>>(),
            [batch],
        ),
        device,
    );
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    model_steps(
        &["sgd", "kfac", "sngd", "hylo"],
        freq,
        progress,
        |capture: &CaptureHandle| {
            CifarResNetConfig::new(32)
                .init::<B>(capture, device)
                .expect("depth 32")
        },
        |m: &CifarResNet<B>| loss_fn.forward(m.forward(x.clone()), y.clone()),
        |m: &CifarResNet<B>| {
            let _ = m.forward(x.clone().narrow(0, 0, 1)).into_data();
        },
    )
}

/// Times the U-Net (`features` channels at the first level, as the LGG run's 32) on batches of
/// `batch` RGB `size x size` images with a Dice loss on random masks, as
/// `benches/peer/torch_step.py --model unet` does.
pub fn unet_steps<B: AutodiffBackend>(
    batch: usize,
    size: usize,
    features: usize,
    optimizers: &[&str],
    freq: usize,
    device: &B::Device,
    progress: &indicatif::ProgressBar,
) -> Vec<StepTiming> {
    let x = Tensor::<B, 4>::random(
        [batch, 3, size, size],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let masks = Tensor::<B, 4>::random([batch, 1, size, size], Distribution::Default, device)
        .greater_elem(0.9)
        .float();
    model_steps(
        optimizers,
        freq,
        progress,
        |capture: &CaptureHandle| {
            hylo_models::UNetConfig::new()
                .with_init_features(features)
                .init::<B>(capture, device)
        },
        |m: &hylo_models::UNet<B>| hylo_train::task::dice_loss(m.forward(x.clone()), masks.clone()),
        |m: &hylo_models::UNet<B>| {
            let _ = m.forward(x.clone().narrow(0, 0, 1)).into_data();
        },
    )
}

/// Times `freq + 1` steps of each of `optimizers` (5 for SGD: every step is alike) on the model
/// `build` makes, with the loss `loss_of` computes on one fixed batch; the curvature is
/// refreshed every `freq` steps; `sync` waits for the device's queued work. `progress` is
/// advanced once per step.
pub fn model_steps<B, M>(
    optimizers: &[&str],
    freq: usize,
    progress: &indicatif::ProgressBar,
    build: impl Fn(&CaptureHandle) -> M,
    loss_of: impl Fn(&M) -> Tensor<B, 1>,
    sync: impl Fn(&M),
) -> Vec<StepTiming>
where
    B: AutodiffBackend,
    M: burn::module::AutodiffModule<B>,
{
    let curvature = CurvatureConfig::new()
        .with_freq(freq)
        .with_damping(DampingConfig::new().with_initial(1.5));
    let mut out = Vec::new();
    for &name in optimizers {
        progress.set_message(format!("steps: {name}"));
        let capture = CaptureHandle::new();
        let mut m = build(&capture);
        let mut times = Vec::new();
        let mut reads = Vec::new();
        let mut step = |m: M, opt: &mut dyn FnMut(M, GradientsParams) -> M| {
            let start = Instant::now();
            // The whole step's reads: forward, backward and the optimizer.
            let before = hylo_optim::host::reads();
            let loss = loss_of(&m);
            let grads = capture.gradients(loss.backward(), &m);
            let m = opt(m, grads);
            reads.push(hylo_optim::host::reads() - before);
            // Wait for the device (a one-sample forward pass: the timing's own synchronisation).
            sync(&m);
            times.push(start.elapsed().as_secs_f64());
            progress.inc(1);
            m
        };
        match name {
            "sgd" => {
                let mut o = SgdConfig::new()
                    .with_momentum(Some(MomentumConfig::new().with_dampening(0.0)))
                    .init::<B, M>();
                // Every SGD step is alike: a warm-up step and four measured ones.
                for _ in 0..5 {
                    m = step(m, &mut |m, g| o.step(0.1, m, g));
                }
            }
            other => {
                let mut o = match other {
                    "kfac" => KfacConfig::new()
                        .with_curvature(curvature.clone())
                        .with_inverse_every(freq)
                        .init::<B>(&capture),
                    "sngd" => SngdConfig::new()
                        .with_curvature(curvature.clone())
                        .init::<B>(&capture),
                    _ => HyloConfig::new()
                        .with_curvature(curvature.clone())
                        .init::<B>(&capture),
                }
                .expect("valid settings");
                for _ in 0..=freq {
                    m = step(m, &mut |m, g| o.step(0.1, m, g));
                }
            }
        }
        let measured = &times[1..times.len().min(freq)];
        let plain = measured.iter().sum::<f64>() / measured.len().max(1) as f64;
        let refresh = if name == "sgd" { plain } else { times[freq] };
        let refresh_reads = if name == "sgd" { 0 } else { reads[freq] };
        let plain_reads = reads[1..reads.len().min(freq)]
            .iter()
            .copied()
            .max()
            .unwrap_or(0);
        out.push(StepTiming {
            optimizer: name.into(),
            refresh_step: refresh,
            plain_step: plain,
            amortised: (refresh + plain * (freq - 1) as f64) / freq as f64,
            reads_refresh_step: refresh_reads,
            reads_plain_step: plain_reads,
        });
    }
    out
}

/// SGD's amortised step among `steps`, if it was timed.
pub fn sgd_amortised(steps: &[StepTiming]) -> Option<f64> {
    steps
        .iter()
        .find(|s| s.optimizer == "sgd")
        .map(|s| s.amortised)
}

/// `seconds` as a multiple of SGD's step (`2.00x`), or `-` without one.
pub fn times_sgd(seconds: f64, sgd: Option<f64>) -> String {
    sgd.map_or("-".into(), |g| format!("{:.2}x", seconds / g))
}

/// ResNet-32's steps on one device (`hylo-bench --steps-only`), timed after an untimed pass.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceSteps {
    /// The `--device` they ran on.
    pub device: String,
    /// Whether the build was optimised (release) rather than the dev profile.
    pub release: bool,
    /// Batch size.
    pub batch: usize,
    /// Steps between curvature refreshes.
    pub freq: usize,
    /// Per optimizer.
    pub steps: Vec<StepTiming>,
}

impl DeviceSteps {
    /// The markdown table: per optimizer the refresh, other and amortised steps in ms, and the
    /// amortised step against SGD's.
    pub fn markdown(&self) -> String {
        let sgd = sgd_amortised(&self.steps);
        let mut md = String::from(
            "| optimizer | refresh step (ms) | other steps (ms) | amortised (ms) | amortised / SGD |\n\
             |---|---|---|---|---|\n",
        );
        for s in &self.steps {
            md.push_str(&format!(
                "| {} | {:.0} | {:.0} | {:.0} | {} |\n",
                s.optimizer,
                s.refresh_step * 1e3,
                s.plain_step * 1e3,
                s.amortised * 1e3,
                times_sgd(s.amortised, sgd)
            ));
        }
        md
    }
}

/// Data loading of CIFAR batches (read from the binary format, random crop + flip, normalised).
#[derive(Clone, Debug, Serialize)]
pub struct LoadTiming {
    /// Samples in a batch.
    pub batch: usize,
    /// Seconds to assemble one batch.
    pub seconds_per_batch: f64,
    /// Samples per second.
    pub samples_per_second: f64,
}

/// Times assembling CIFAR-10 batches of `batch` from a file written in the binary format.
pub fn cifar_loading(batch: usize) -> LoadTiming {
    let dir = tempfile::tempdir().expect("temp dir");
    let records: Vec<(u8, Vec<u8>)> = (0..2048u32)
        .map(|i| {
            (
                (i % 10) as u8,
                (0..3072u32).map(|p| (p * 7 + i) as u8).collect(),
            )
        })
        .collect();
    std::fs::write(
        dir.path().join("test_batch.bin"),
        encode_cifar(CifarVariant::Cifar10, &records),
    )
    .expect("write");
    let data =
        CifarDataset::load(dir.path(), CifarVariant::Cifar10, Split::Test).expect("read back");
    let source = Augmented {
        inner: data,
        augment: RandomCropFlip::cifar(),
    };
    let batcher = SampleBatcher::new(Arc::new(source), Normalization::cifar10(), 0);
    let order = EpochOrder::new(2048, batch, 0, 0, true, true);
    let refs = order.refs();
    let batches = refs.len() / batch;
    let start = Instant::now();
    for b in 0..batches {
        let out = batcher
            .load::<Flex>(&refs[b * batch..(b + 1) * batch], &Default::default())
            .expect("batch");
        std::hint::black_box(out);
    }
    let per = start.elapsed().as_secs_f64() / batches as f64;
    LoadTiming {
        batch,
        seconds_per_batch: per,
        samples_per_second: batch as f64 / per,
    }
}
