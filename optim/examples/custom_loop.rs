//! Using the optimizers from your own Burn project: a model built from the capture wrappers,
//! one shared `CaptureHandle`, and a plain training loop with the default recipe (SGD's step
//! size grafted onto the natural-gradient direction, adaptive damping). Run with
//! `cargo run -p hylo-optim --example custom_loop`.
#![allow(clippy::disallowed_methods)] // Tests and examples read the device freely.

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::LinearConfig;
use burn::tensor::{activation::relu, backend::Backend, Distribution, Int, Tensor};
use hylo_optim::{CaptureHandle, CapturedLinear, CurvatureConfig, HyloConfig};

#[derive(Module, Debug)]
struct Net<B: Backend> {
    hidden: CapturedLinear<B>,
    out: CapturedLinear<B>,
}

impl<B: Backend> Net<B> {
    fn new(capture: &CaptureHandle, device: &B::Device) -> Self {
        Self {
            hidden: CapturedLinear::from_config(&LinearConfig::new(16, 32), capture, device),
            out: CapturedLinear::from_config(&LinearConfig::new(32, 4), capture, device),
        }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.out.forward(relu(self.hidden.forward(x)))
    }
}

/// A batch: inputs and classes.
type Batch<B> = (Tensor<B, 2>, Tensor<B, 1, Int>);

fn main() {
    type B = Autodiff<Flex>;
    let device = Default::default();
    let capture = CaptureHandle::new();
    let mut model = Net::<B>::new(&capture, &device);
    // The defaults: grafting, gradient-scale rows, adaptive damping from 1; refresh every 5.
    let mut optim = HyloConfig::new()
        .with_curvature(CurvatureConfig::new().with_freq(5))
        .init::<B>(&capture)
        .expect("valid settings");
    let x = Tensor::<B, 2>::random([256, 16], Distribution::Normal(0.0, 1.0), &device);
    let y: Tensor<B, 1, Int> = x.clone().slice([0..256, 0..4]).argmax(1).reshape([256]);
    let batches: Vec<Batch<B>> = (0..8)
        .map(|k| {
            (
                x.clone().slice(k * 32..(k + 1) * 32),
                y.clone().slice(k * 32..(k + 1) * 32),
            )
        })
        .collect();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let loss_of =
        |model: &Net<B>, (x, y): &Batch<B>| loss_fn.forward(model.forward(x.clone()), y.clone());
    for epoch in 0..5 {
        for batch in &batches {
            let loss = loss_of(&model, batch);
            // Instead of `GradientsParams::from_grads(loss.backward(), &model)`: the handle
            // reads the curvature the layers captured and keeps what adaptive damping needs.
            let grads = capture.gradients_with_loss(loss, &model, batch, loss_of);
            // `Optimizer::step` that also says when the optimizer gave up (too many blown-up
            // curvature periods in a row): the module comes back with the error.
            model = match optim.try_step(0.1, model, grads) {
                Ok(model) => model,
                Err(gave_up) => {
                    eprintln!("{}", gave_up.error);
                    return;
                }
            };
        }
        let loss = loss_of(&model, &(x.clone(), y.clone()));
        println!(
            "epoch {epoch}: loss {:.4}, damping {:.3}, step-length factor {:.2}, mode {:?}",
            loss.into_scalar(),
            optim.damping(),
            optim.step_scale(),
            optim.mode()
        );
    }
}
