//! `CapturedConv2d`: Burn's `Conv2d` that records curvature data on curvature steps.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::geometry::{same_padding, LayerGeometry};
use super::handle::{CaptureHandle, PendingCapture, RawInput};
use crate::error::ConfigError;

/// Burn's `Conv2d` (same config, weights and output) that feeds the curvature optimizers.
#[derive(Module, Debug)]
pub struct CapturedConv2d<B: Backend> {
    /// The wrapped layer; its parameters are the ones the optimizer updates.
    pub inner: Conv2d<B>,
    #[module(skip)]
    capture: CaptureHandle,
}

impl<B: Backend> CapturedConv2d<B> {
    /// Wraps an existing layer; grouped convolutions are refused.
    pub fn new(inner: Conv2d<B>, capture: &CaptureHandle) -> Result<Self, ConfigError> {
        if inner.groups != 1 {
            return Err(ConfigError::Unsupported(format!(
                "Conv2d with groups = {} cannot be preconditioned (only groups = 1); \
                 use a plain Conv2d for it",
                inner.groups
            )));
        }
        Ok(Self {
            inner,
            capture: capture.clone(),
        })
    }

    /// Builds the layer from Burn's config, exactly as `config.init(device)` would.
    pub fn from_config(
        config: &Conv2dConfig,
        capture: &CaptureHandle,
        device: &B::Device,
    ) -> Result<Self, ConfigError> {
        Self::new(config.init(device), capture)
    }

    /// The layer's shape for an input of spatial size `[height, width]`.
    pub fn geometry(&self, height: usize, width: usize) -> LayerGeometry {
        let [channels_out, channels_in, k0, k1] = self.inner.weight.dims();
        let kernel = [k0, k1];
        let stride = self.inner.stride;
        let padding = match &self.inner.padding {
            PaddingConfig2d::Valid => [0, 0, 0, 0],
            PaddingConfig2d::Explicit(top, left, bottom, right) => [*top, *bottom, *left, *right],
            PaddingConfig2d::Same => {
                let (top, bottom) = same_padding(k0, stride[0], height);
                let (left, right) = same_padding(k1, stride[1], width);
                [top, bottom, left, right]
            }
        };
        LayerGeometry::Conv2d {
            channels_in,
            channels_out,
            kernel,
            stride,
            dilation: self.inner.dilation,
            padding,
            bias: self.inner.bias.is_some(),
        }
    }

    /// `Conv2d::forward`: on `Autodiff<Flex>` as matrix products with a backward of the same
    /// kind ([`crate::gemm_conv`]), elsewhere Burn's convolution.
    fn convolve(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, _, height, width] = input.dims();
        let LayerGeometry::Conv2d {
            stride,
            dilation,
            padding,
            ..
        } = self.geometry(height, width)
        else {
            unreachable!("a convolution's geometry")
        };
        let settings = crate::gemm_conv::ConvSettings {
            stride,
            dilation,
            padding,
            groups: self.inner.groups,
        };
        let bias = self.inner.bias.as_ref().map(|b| b.val());
        match crate::gemm_conv::conv2d(input, self.inner.weight.val(), bias, settings) {
            Ok(output) => output,
            Err((input, _, _)) => self.inner.forward(input),
        }
    }

    /// Same result as `Conv2d::forward`; on an armed autodiff pass it also records the input
    /// and adds a zero probe to the output.
    pub fn forward(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        let device = input.device();
        if !(self.capture.is_armed() && B::ad_enabled(&device)) {
            return self.convolve(input);
        }
        let [_, _, height, width] = input.dims();
        let geometry = self.geometry(height, width);
        let recorded = input.clone().detach();
        let output = self.convolve(input);
        let [batch, channels_out, h_out, w_out] = output.dims();
        let probe =
            Tensor::<B, 3>::zeros([batch, channels_out, h_out * w_out], &device).require_grad();
        self.capture.record(PendingCapture {
            weight_id: self.inner.weight.id,
            bias_id: self.inner.bias.as_ref().map(|b| b.id),
            geometry,
            input: RawInput::Conv(recorded),
            probe: probe.clone(),
        });
        output + probe.reshape([batch, channels_out, h_out, w_out])
    }
}
