//! A configurable multilayer perceptron of captured linear layers.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use hylo_optim::capture::{CaptureHandle, CapturedLinear};

use crate::blocks::captured_linear;

/// Settings of [`Mlp`].
#[derive(Config, Debug)]
pub struct MlpConfig {
    /// Input features (a 4-D image input is flattened to `c * h * w`).
    pub input: usize,
    /// Hidden layer widths, in order; empty for a linear model.
    pub hidden: Vec<usize>,
    /// Number of outputs.
    pub classes: usize,
}

/// Linear-ReLU layers followed by a linear output layer.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    layers: Vec<CapturedLinear<B>>,
}

impl MlpConfig {
    /// Builds the model; every layer reports to `capture`.
    pub fn init<B: Backend>(&self, capture: &CaptureHandle, device: &B::Device) -> Mlp<B> {
        let mut dims = vec![self.input];
        dims.extend(&self.hidden);
        dims.push(self.classes);
        Mlp {
            layers: dims
                .windows(2)
                .map(|w| captured_linear(w[0], w[1], capture, device))
                .collect(),
        }
    }
}

impl<B: Backend> Mlp<B> {
    /// Outputs `[n, classes]` for inputs `[n, input]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let last = self.layers.len() - 1;
        let mut h = x;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(h);
            if i < last {
                h = relu(h);
            }
        }
        h
    }

    /// Outputs for images `[n, c, h, w]`, flattened first.
    pub fn forward_images(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let [n, c, h, w] = x.dims();
        self.forward(x.reshape([n, c * h * w]))
    }
}
