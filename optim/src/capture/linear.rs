//! `CapturedLinear`: Burn's `Linear` that records curvature data on curvature steps.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::geometry::LayerGeometry;
use super::handle::{CaptureHandle, PendingCapture, RawInput};

/// Burn's `Linear` (same config, weights and output) that feeds the curvature optimizers.
#[derive(Module, Debug)]
pub struct CapturedLinear<B: Backend> {
    /// The wrapped layer; its parameters are the ones the optimizer updates.
    pub inner: Linear<B>,
    #[module(skip)]
    capture: CaptureHandle,
}

impl<B: Backend> CapturedLinear<B> {
    /// Wraps an existing layer.
    pub fn new(inner: Linear<B>, capture: &CaptureHandle) -> Self {
        Self {
            inner,
            capture: capture.clone(),
        }
    }

    /// Builds the layer from Burn's config, exactly as `config.init(device)` would.
    pub fn from_config(config: &LinearConfig, capture: &CaptureHandle, device: &B::Device) -> Self {
        Self::new(config.init(device), capture)
    }

    /// The layer's shape.
    pub fn geometry(&self) -> LayerGeometry {
        let [d_in, d_out] = self.inner.weight.dims();
        LayerGeometry::Linear {
            d_in,
            d_out,
            bias: self.inner.bias.is_some(),
        }
    }

    /// Same result as `Linear::forward`; on an armed autodiff pass it also records the input
    /// and adds a zero probe to the output.
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let device = input.device();
        if !(self.capture.is_armed() && B::ad_enabled(&device)) || D < 2 {
            return self.inner.forward(input);
        }
        let dims = input.dims();
        let d_in = dims[D - 1];
        let batch = dims[0];
        let positions = dims[1..D - 1].iter().product::<usize>();
        let flat_input = input.clone().detach().reshape([batch, positions, d_in]);
        let output = self.inner.forward(input);
        let out_dims = output.dims();
        let d_out = out_dims[D - 1];
        let probe = Tensor::<B, 3>::zeros([batch, positions, d_out], &device).require_grad();
        self.capture.record(PendingCapture {
            weight_id: self.inner.weight.id,
            bias_id: self.inner.bias.as_ref().map(|b| b.id),
            geometry: self.geometry(),
            input: RawInput::Linear(flat_input),
            probe: probe.clone(),
        });
        output + probe.reshape(out_dims)
    }
}
