//! Using the optimizers from your own Burn project: a model built from the capture wrappers,
//! one shared `CaptureHandle`, and a plain training loop. Run with
//! `cargo run -p hylo-optim --example custom_loop`.

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::LinearConfig;
use burn::optim::Optimizer;
use burn::tensor::{activation::relu, backend::Backend, Distribution, Int, Tensor};
use hylo_optim::{CaptureHandle, CapturedLinear, CurvatureConfig, DampingConfig, HyloConfig};

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

fn main() {
    type B = Autodiff<Flex>;
    let device = Default::default();
    let capture = CaptureHandle::new();
    let mut model = Net::<B>::new(&capture, &device);
    let mut optim = HyloConfig::new()
        .with_curvature(
            CurvatureConfig::new()
                .with_freq(5)
                .with_damping(DampingConfig::new().with_initial(0.3)),
        )
        .init::<B>(&capture)
        .expect("valid settings");
    let x = Tensor::<B, 2>::random([64, 16], Distribution::Normal(0.0, 1.0), &device);
    let y = x.clone().slice([0..64, 0..4]).argmax(1).reshape([64]);
    let y: Tensor<B, 1, Int> = y;
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    for step in 0..20 {
        let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
        // Route the gradients through the handle: it reads the curvature the layers captured.
        let grads = capture.gradients(loss.backward(), &model);
        model = optim.step(0.1, model, grads);
        if step % 5 == 0 {
            let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
            println!(
                "step {step}: loss {:.4} mode {:?}",
                loss.into_scalar(),
                optim.mode()
            );
        }
    }
}
