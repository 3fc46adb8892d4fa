//! A small CNN (two 3x3 convolutions and a linear classifier) for quick runs and the demo.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::Conv2dConfig;
use burn::nn::{LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use hylo_optim::capture::{CaptureHandle, CapturedConv2d, CapturedLinear};

/// Settings of [`SmallCnn`].
#[derive(Config, Debug)]
pub struct SmallCnnConfig {
    /// Input channels.
    #[config(default = 1)]
    pub channels: usize,
    /// Side of the (square) input images; must be divisible by 2.
    pub image_size: usize,
    /// Number of classes.
    pub classes: usize,
    /// Channels of the hidden convolutions.
    #[config(default = 8)]
    pub width: usize,
}

/// conv3x3 -> ReLU -> conv3x3 stride 2 -> ReLU -> linear; every layer preconditionable.
#[derive(Module, Debug)]
pub struct SmallCnn<B: Backend> {
    conv1: CapturedConv2d<B>,
    conv2: CapturedConv2d<B>,
    fc: CapturedLinear<B>,
}

impl SmallCnnConfig {
    /// Builds the model; its layers report to `capture`.
    pub fn init<B: Backend>(&self, capture: &CaptureHandle, device: &B::Device) -> SmallCnn<B> {
        let pad = PaddingConfig2d::Explicit(1, 1, 1, 1);
        let conv = |c_in, stride| {
            Conv2dConfig::new([c_in, self.width], [3, 3])
                .with_padding(pad.clone())
                .with_stride([stride, stride])
        };
        let out = self.image_size / 2;
        SmallCnn {
            conv1: CapturedConv2d::from_config(&conv(self.channels, 1), capture, device)
                .expect("groups = 1"),
            conv2: CapturedConv2d::from_config(&conv(self.width, 2), capture, device)
                .expect("groups = 1"),
            fc: CapturedLinear::from_config(
                &LinearConfig::new(self.width * out * out, self.classes),
                capture,
                device,
            ),
        }
    }
}

impl<B: Backend> SmallCnn<B> {
    /// Logits `[n, classes]` for images `[n, channels, size, size]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let h = relu(self.conv2.forward(relu(self.conv1.forward(x))));
        let [n, c, hh, ww] = h.dims();
        self.fc.forward(h.reshape([n, c * hh * ww]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    #[test]
    fn forward_and_backward_shapes() {
        type B = Autodiff<Flex>;
        let capture = CaptureHandle::new();
        let model = SmallCnnConfig::new(8, 4).init::<B>(&capture, &Default::default());
        capture.arm(true);
        let y = model.forward(Tensor::zeros([2, 1, 8, 8], &Default::default()));
        assert_eq!(y.dims(), [2, 4]);
        assert_eq!(capture.pending_len(), 3);
        let grads = y.sum().backward();
        capture.collect::<B>(&grads);
        assert_eq!(capture.take::<Flex>().len(), 3);
    }
}
