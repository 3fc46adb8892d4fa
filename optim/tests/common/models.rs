//! Small models built from the capture wrappers, and a fixed synthetic problem.
#![allow(clippy::disallowed_methods)] // Tests and examples read the device freely.
#![allow(dead_code)]

use burn::module::Module;
use burn::nn::conv::Conv2dConfig;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{LinearConfig, PaddingConfig2d};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use hylo_optim::capture::{CaptureHandle, CapturedConv2d, CapturedLinear};

use super::{rng_lock, values, TB};

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub l1: CapturedLinear<B>,
    pub l2: CapturedLinear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn new(d_in: usize, hidden: usize, classes: usize, capture: &CaptureHandle) -> Self {
        let device = Default::default();
        let _rng = rng_lock();
        B::seed(&device, 7);
        let model = Self {
            l1: CapturedLinear::from_config(&LinearConfig::new(d_in, hidden), capture, &device),
            l2: CapturedLinear::from_config(&LinearConfig::new(hidden, classes), capture, &device),
        };
        materialised(model)
    }

    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.l2.forward(relu(self.l1.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct Cnn<B: Backend> {
    pub c1: CapturedConv2d<B>,
    pub c2: CapturedConv2d<B>,
    pub fc: CapturedLinear<B>,
}

impl<B: Backend> Cnn<B> {
    pub fn new(classes: usize, capture: &CaptureHandle) -> Self {
        let device = Default::default();
        let _rng = rng_lock();
        B::seed(&device, 11);
        let same = PaddingConfig2d::Explicit(1, 1, 1, 1);
        let model = Self {
            c1: CapturedConv2d::from_config(
                &Conv2dConfig::new([1, 6], [3, 3]).with_padding(same.clone()),
                capture,
                &device,
            )
            .unwrap(),
            c2: CapturedConv2d::from_config(
                &Conv2dConfig::new([6, 8], [3, 3])
                    .with_padding(same)
                    .with_stride([2, 2]),
                capture,
                &device,
            )
            .unwrap(),
            fc: CapturedLinear::from_config(
                &LinearConfig::new(8 * 4 * 4, classes),
                capture,
                &device,
            ),
        };
        materialised(model)
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let h = relu(self.c2.forward(relu(self.c1.forward(x))));
        let [n, c, hh, ww] = h.dims();
        self.fc.forward(h.reshape([n, c * hh * ww]))
    }
}

/// `model` with its lazily initialised parameters drawn now (while the caller holds the RNG).
pub fn materialised<B: Backend, M: Module<B>>(model: M) -> M {
    let record = model.clone().into_record();
    model.load_record(record)
}

/// An ill-conditioned linear-teacher classification problem: features scaled over three decades.
pub fn mlp_problem(n: usize, d_in: usize, classes: usize) -> (Tensor<TB, 2>, Tensor<TB, 1, Int>) {
    let raw = values(100, n * d_in);
    let scales: Vec<f32> = (0..d_in)
        .map(|j| 10f32.powf(j as f32 / (d_in - 1) as f32 * 3.0 - 1.5))
        .collect();
    let x: Vec<f32> = raw
        .iter()
        .enumerate()
        .map(|(k, v)| v * scales[k % d_in])
        .collect();
    let teacher = values(101, d_in * classes);
    let labels: Vec<i64> = (0..n)
        .map(|i| {
            (0..classes)
                .map(|c| {
                    (0..d_in)
                        .map(|j| raw[i * d_in + j] * teacher[j * classes + c])
                        .sum::<f32>()
                })
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap()
                .0 as i64
        })
        .collect();
    let dev = Default::default();
    (
        Tensor::from_data(TensorData::new(x, [n, d_in]), &dev),
        Tensor::from_data(TensorData::new(labels, [n]), &dev),
    )
}

/// Images whose class is the quadrant holding a bright blob, on a noisy background.
pub fn cnn_problem(n: usize) -> (Tensor<TB, 4>, Tensor<TB, 1, Int>) {
    cnn_problem_with(n, 0.3, 2.0)
}

/// `cnn_problem` with a given background noise level and blob brightness.
pub fn cnn_problem_with(
    n: usize,
    noise_level: f32,
    amplitude: f32,
) -> (Tensor<TB, 4>, Tensor<TB, 1, Int>) {
    let noise = values(200, n * 64);
    let mut x = vec![0f32; n * 64];
    let mut labels = Vec::new();
    for i in 0..n {
        let class = i % 4;
        let (r0, c0) = ((class / 2) * 4, (class % 2) * 4);
        let jitter = (noise[i * 64].abs() * 2.0) as usize;
        for p in 0..64 {
            x[i * 64 + p] = noise_level * noise[i * 64 + p];
        }
        for dr in 0..2 {
            for dc in 0..2 {
                let (r, c) = (r0 + jitter + dr, c0 + 1 + dc);
                x[i * 64 + r * 8 + c] += amplitude;
            }
        }
        labels.push(class as i64);
    }
    let dev = Default::default();
    (
        Tensor::from_data(TensorData::new(x, [n, 1, 8, 8]), &dev),
        Tensor::from_data(TensorData::new(labels, [n]), &dev),
    )
}

pub fn cross_entropy(logits: Tensor<TB, 2>, y: Tensor<TB, 1, Int>) -> Tensor<TB, 1> {
    CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits, y)
}

/// One training step; returns the model after the step and the loss before it.
pub fn step<M, O, F>(
    model: M,
    optim: &mut O,
    capture: &CaptureHandle,
    lr: f64,
    loss_of: F,
) -> (M, f64)
where
    M: burn::module::AutodiffModule<TB>,
    O: Optimizer<M, TB>,
    F: Fn(&M) -> Tensor<TB, 1>,
{
    let loss = loss_of(&model);
    let value: f64 = loss.clone().into_scalar().into();
    let grads: GradientsParams = capture.gradients::<TB, M>(loss.backward(), &model);
    (optim.step(lr, model, grads), value)
}
