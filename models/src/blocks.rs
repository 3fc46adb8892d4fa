//! Shared building blocks: Kaiming-initialised captured convolutions and linear layers.

use burn::module::Initializer;
use burn::nn::conv::Conv2dConfig;
use burn::nn::{LinearConfig, PaddingConfig2d};
use burn::tensor::backend::Backend;
use hylo_optim::capture::{CaptureHandle, CapturedConv2d, CapturedLinear};

use crate::batch_norm::{BatchNorm2d, BatchNorm2dConfig};

/// Kaiming-normal initialiser for ReLU networks (fan-out mode, as torchvision's ResNets).
pub fn kaiming_relu() -> Initializer {
    Initializer::KaimingNormal {
        gain: std::f64::consts::SQRT_2,
        fan_out_only: true,
    }
}

/// Settings of a `k x k` convolution with `padding = k / 2` and Kaiming-normal weights.
pub fn conv(channels: [usize; 2], kernel: usize, stride: usize, bias: bool) -> Conv2dConfig {
    let pad = kernel / 2;
    Conv2dConfig::new(channels, [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_bias(bias)
        .with_initializer(kaiming_relu())
}

/// Builds a captured convolution from [`conv`]'s settings.
pub fn captured_conv<B: Backend>(
    channels: [usize; 2],
    kernel: usize,
    stride: usize,
    bias: bool,
    capture: &CaptureHandle,
    device: &B::Device,
) -> CapturedConv2d<B> {
    let config = conv(channels, kernel, stride, bias);
    CapturedConv2d::from_config(&config, capture, device).expect("groups = 1 is always supported")
}

/// A captured linear layer with Burn's default (Kaiming-uniform, fan-in) initialisation.
pub fn captured_linear<B: Backend>(
    d_in: usize,
    d_out: usize,
    capture: &CaptureHandle,
    device: &B::Device,
) -> CapturedLinear<B> {
    CapturedLinear::from_config(&LinearConfig::new(d_in, d_out), capture, device)
}

/// Batch normalisation over `channels` with unit scale and zero shift.
pub fn batch_norm<B: Backend>(channels: usize, device: &B::Device) -> BatchNorm2d<B> {
    BatchNorm2dConfig::new(channels).init(device)
}
