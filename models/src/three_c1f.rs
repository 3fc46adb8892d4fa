//! 3C1F: the HyLo paper's Fashion-MNIST network (three 3x3 convolutions, max-pool, two linears).

use burn::config::Config;
use burn::module::Module;
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::module::max_pool2d;
use burn::tensor::Tensor;
use hylo_optim::capture::{CaptureHandle, CapturedConv2d, CapturedLinear};

use crate::blocks::{captured_conv, captured_linear};

/// Settings of 3C1F.
#[derive(Config, Debug)]
pub struct ThreeC1FConfig {
    /// Input channels.
    #[config(default = 1)]
    pub channels: usize,
    /// Side of the square input (28 for Fashion-MNIST); must be at least 3.
    #[config(default = 28)]
    pub image_size: usize,
    /// Channels of the three convolutions.
    #[config(default = 128)]
    pub width: usize,
    /// Hidden units of the first linear layer.
    #[config(default = 500)]
    pub hidden: usize,
    /// Number of classes.
    #[config(default = 10)]
    pub classes: usize,
}

/// conv3x3-ReLU x3 -> max-pool 3 -> Linear -> ReLU -> Linear.
#[derive(Module, Debug)]
pub struct ThreeC1F<B: Backend> {
    convs: Vec<CapturedConv2d<B>>,
    fc1: CapturedLinear<B>,
    fc2: CapturedLinear<B>,
}

impl ThreeC1FConfig {
    /// Builds the model; every layer reports to `capture`.
    pub fn init<B: Backend>(&self, capture: &CaptureHandle, device: &B::Device) -> ThreeC1F<B> {
        let w = self.width;
        let convs = [[self.channels, w], [w, w], [w, w]]
            .into_iter()
            .map(|ch| captured_conv(ch, 3, 1, true, capture, device))
            .collect();
        let pooled = self.image_size / 3;
        ThreeC1F {
            convs,
            fc1: captured_linear(w * pooled * pooled, self.hidden, capture, device),
            fc2: captured_linear(self.hidden, self.classes, capture, device),
        }
    }
}

impl<B: Backend> ThreeC1F<B> {
    /// Logits `[n, classes]` for images `[n, channels, size, size]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let mut h = x;
        for conv in &self.convs {
            h = relu(conv.forward(h));
        }
        let h = max_pool2d(h, [3, 3], [3, 3], [0, 0], [1, 1], false);
        let [n, c, hh, ww] = h.dims();
        self.fc2
            .forward(relu(self.fc1.forward(h.reshape([n, c * hh * ww]))))
    }
}
