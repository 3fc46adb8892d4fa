//! U-Net of the LGG brain-MRI study (Buda et al. 2019): the HyLo paper's segmentation model.

use crate::batch_norm::BatchNorm2d;
use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{ConvTranspose2d, ConvTranspose2dConfig};
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::backend::Backend;
use burn::tensor::module::max_pool2d;
use burn::tensor::Tensor;
use hylo_optim::capture::{CaptureHandle, CapturedConv2d};

use crate::blocks::{batch_norm, captured_conv};

/// Settings of the U-Net.
#[derive(Config, Debug)]
pub struct UNetConfig {
    /// Input channels (3 for the RGB MRI slices).
    #[config(default = 3)]
    pub in_channels: usize,
    /// Output channels (1: a foreground probability).
    #[config(default = 1)]
    pub out_channels: usize,
    /// Channels of the first encoder block; doubled at each of the four levels.
    #[config(default = 32)]
    pub init_features: usize,
}

/// `[conv3x3 (no bias), BN, ReLU] x 2`.
#[derive(Module, Debug)]
pub struct UNetBlock<B: Backend> {
    conv1: CapturedConv2d<B>,
    bn1: BatchNorm2d<B>,
    conv2: CapturedConv2d<B>,
    bn2: BatchNorm2d<B>,
}

impl<B: Backend> UNetBlock<B> {
    fn new(c_in: usize, c_out: usize, capture: &CaptureHandle, device: &B::Device) -> Self {
        Self {
            conv1: captured_conv([c_in, c_out], 3, 1, false, capture, device),
            bn1: batch_norm(c_out, device),
            conv2: captured_conv([c_out, c_out], 3, 1, false, capture, device),
            bn2: batch_norm(c_out, device),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = relu(self.bn1.forward(self.conv1.forward(x)));
        relu(self.bn2.forward(self.conv2.forward(h)))
    }
}

/// Encoder of four blocks with 2x2 max-pooling, a bottleneck, and a decoder with 2x2 transposed
/// convolutions and skip concatenations; a 1x1 convolution and a sigmoid give the mask.
#[derive(Module, Debug)]
pub struct UNet<B: Backend> {
    encoders: Vec<UNetBlock<B>>,
    bottleneck: UNetBlock<B>,
    /// Transposed convolutions (not preconditioned: they get the SGD update).
    upconvs: Vec<ConvTranspose2d<B>>,
    decoders: Vec<UNetBlock<B>>,
    head: CapturedConv2d<B>,
}

impl UNetConfig {
    /// Builds the model; its 3x3 and 1x1 convolutions report to `capture`.
    pub fn init<B: Backend>(&self, capture: &CaptureHandle, device: &B::Device) -> UNet<B> {
        let f = self.init_features;
        let widths = [f, 2 * f, 4 * f, 8 * f];
        let mut encoders = Vec::new();
        let mut c_in = self.in_channels;
        for &w in &widths {
            encoders.push(UNetBlock::new(c_in, w, capture, device));
            c_in = w;
        }
        let bottleneck = UNetBlock::new(8 * f, 16 * f, capture, device);
        let mut upconvs = Vec::new();
        let mut decoders = Vec::new();
        for &w in widths.iter().rev() {
            upconvs.push(
                ConvTranspose2dConfig::new([2 * w, w], [2, 2])
                    .with_stride([2, 2])
                    .init(device),
            );
            decoders.push(UNetBlock::new(2 * w, w, capture, device));
        }
        UNet {
            encoders,
            bottleneck,
            upconvs,
            decoders,
            head: captured_conv([f, self.out_channels], 1, 1, true, capture, device),
        }
    }
}

impl<B: Backend> UNet<B> {
    /// Foreground probabilities `[n, out, h, w]` for images `[n, in, h, w]` (h, w multiples of 16).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        sigmoid(self.forward_logits(x))
    }

    /// Pre-sigmoid scores `[n, out, h, w]`.
    pub fn forward_logits(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut skips = Vec::with_capacity(self.encoders.len());
        let mut h = x;
        for encoder in &self.encoders {
            let e = encoder.forward(h);
            h = max_pool2d(e.clone(), [2, 2], [2, 2], [0, 0], [1, 1], false);
            skips.push(e);
        }
        h = self.bottleneck.forward(h);
        for ((up, decoder), skip) in self
            .upconvs
            .iter()
            .zip(&self.decoders)
            .zip(skips.into_iter().rev())
        {
            h = decoder.forward(Tensor::cat(vec![up.forward(h), skip], 1));
        }
        self.head.forward(h)
    }
}
