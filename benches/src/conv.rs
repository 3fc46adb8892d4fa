//! Convolutions on the CPU (Flex): Burn's `Conv2d` against `CapturedConv2d`'s matrix-product
//! form (`hylo_optim::gemm_conv`), per layer shape of a real model, forward and backward.

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::{Distribution, Tensor};
use hylo_optim::capture::LayerGeometry;
use hylo_optim::gemm_conv::ConvPath;
use hylo_optim::{CaptureHandle, CapturedConv2d};
use serde::{Deserialize, Serialize};

use crate::layers::LayerCase;
use crate::seconds;

type B = Autodiff<Flex>;

/// Forward and backward seconds of one convolution shape, Burn's against ours.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConvTiming {
    /// `conv2d 64->64 k3x3 s1`.
    pub shape: String,
    /// Layers of the model with this shape.
    pub count: usize,
    /// Input `[n, C, H, W]`.
    pub input: [usize; 4],
    /// Burn's `Conv2d`: forward.
    pub burn_forward: f64,
    /// Burn's `Conv2d`: backward (input and weight gradients).
    pub burn_backward: f64,
    /// `CapturedConv2d` (matrix products): forward.
    pub gemm_forward: f64,
    /// `CapturedConv2d`: backward.
    pub gemm_backward: f64,
    /// Scratch memory of the matrix-product form per worker task (bytes): one sample's phase
    /// images and their gradient, the wide output and the gradient accumulators (no unfolded
    /// patches).
    pub scratch_bytes: usize,
    /// Which implementation `CapturedConv2d` ran (`gemm`, or `burn` for the shapes routed to
    /// Burn's kernel).
    pub path: String,
    /// The largest relative error of ours against Burn's (output, input and weight gradients).
    pub max_rel_err: f64,
}

/// `|a - b| / |b|` over whole buffers.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

impl ConvTiming {
    /// Burn's forward + backward over ours.
    pub fn speedup(&self) -> f64 {
        (self.burn_forward + self.burn_backward) / (self.gemm_forward + self.gemm_backward)
    }
}

/// The convolutions among `cases`.
pub fn conv_cases(cases: Vec<LayerCase>) -> Vec<LayerCase> {
    cases
        .into_iter()
        .filter(|c| matches!(c.geometry(), LayerGeometry::Conv2d { .. }))
        .collect()
}

/// Burn's `Conv2d` of `case`'s shape (explicit padding, its bias or none), initialised.
pub fn burn_conv(case: &LayerCase) -> Conv2d<B> {
    let LayerGeometry::Conv2d {
        channels_in,
        channels_out,
        kernel,
        stride,
        dilation,
        padding,
        bias,
    } = case.geometry().clone()
    else {
        panic!("{}: not a convolution", case.shape)
    };
    let [top, bottom, left, right] = padding;
    let conv = Conv2dConfig::new([channels_in, channels_out], kernel)
        .with_stride(stride)
        .with_dilation(dilation)
        .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
        .with_bias(bias)
        .init::<B>(&Default::default());
    conv.clone().load_record(conv.into_record())
}

/// Times Burn's and our convolution of `case` at batch `n` (the minimum of `repeats` runs).
pub fn time_conv(case: &LayerCase, n: usize, repeats: usize) -> ConvTiming {
    let conv = burn_conv(case);
    let ours = CapturedConv2d::new(conv.clone(), &CaptureHandle::new()).expect("groups = 1");
    let [c, h, w] = case.input_dims() else {
        panic!("{}: a convolution input is [C, H, W]", case.shape)
    };
    let input = [n, *c, *h, *w];
    let x = Tensor::<B, 4>::random(input, Distribution::Normal(0.0, 1.0), &Default::default())
        .require_grad();
    let weight = conv.weight.val();
    let time = |forward: &dyn Fn() -> Tensor<B, 4>| {
        let fwd = seconds(repeats, || forward().sum().into_scalar());
        let total = seconds(repeats, || {
            let grads = forward().sum().backward();
            let gx = x.grad(&grads).expect("input gradient");
            let gw = weight.grad(&grads).expect("weight gradient");
            gx.sum().into_scalar() + gw.sum().into_scalar()
        });
        (fwd, (total - fwd).max(0.0))
    };
    // The results first: ours against Burn's, output and both gradients.
    let results = |forward: &dyn Fn() -> Tensor<B, 4>| {
        let y = forward();
        let grads = (y.clone() * y.clone()).sum().backward();
        let flat = |t: Tensor<burn::backend::Flex, 4>| -> Vec<f32> {
            t.into_data().to_vec().expect("f32")
        };
        [
            flat(y.inner()),
            flat(x.grad(&grads).expect("input gradient")),
            flat(weight.grad(&grads).expect("weight gradient")),
        ]
    };
    let expected = results(&|| conv.forward(x.clone()));
    let got = results(&|| ours.forward(x.clone()));
    let path = hylo_optim::gemm_conv::last_path().unwrap_or(ConvPath::Burn);
    let max_rel_err = expected
        .iter()
        .zip(&got)
        .map(|(e, g)| rel_err(g, e))
        .fold(0.0, f64::max);
    let (burn_forward, burn_backward) = time(&|| conv.forward(x.clone()));
    let (gemm_forward, gemm_backward) = time(&|| ours.forward(x.clone()));
    let LayerGeometry::Conv2d {
        channels_out,
        kernel,
        stride,
        dilation,
        padding,
        ..
    } = case.geometry().clone()
    else {
        unreachable!("a convolution")
    };
    let shape = hylo_optim::gemm_conv::kernels::ConvShape::new(
        input,
        [channels_out, *c, kernel[0], kernel[1]],
        stride,
        dilation,
        padding,
    )
    .expect("a model's convolution");
    ConvTiming {
        path: format!("{path:?}").to_lowercase(),
        max_rel_err,
        shape: case.shape.clone(),
        count: case.count,
        input,
        burn_forward,
        burn_backward,
        gemm_forward,
        gemm_backward,
        scratch_bytes: shape.scratch_bytes(),
    }
}

/// The timings as a markdown table with totals weighted by the layer counts.
pub fn markdown(title: &str, timings: &[ConvTiming]) -> String {
    let ms = |s: f64| format!("{:.1}", s * 1e3);
    let mut out = format!(
        "#### {title}\n\n| shape | layers | input | Burn fwd | Burn bwd | ours fwd | ours bwd | \
         speed-up | scratch/task | path | error vs Burn |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    let mut totals = [0.0; 4];
    for t in timings {
        let k = t.count as f64;
        totals[0] += k * t.burn_forward;
        totals[1] += k * t.burn_backward;
        totals[2] += k * t.gemm_forward;
        totals[3] += k * t.gemm_backward;
        out.push_str(&format!(
            "| {} | {} | {:?} | {} | {} | {} | {} | {:.2}x | {:.0} KB | {} | {:.1e} |\n",
            t.shape,
            t.count,
            t.input,
            ms(t.burn_forward),
            ms(t.burn_backward),
            ms(t.gemm_forward),
            ms(t.gemm_backward),
            t.speedup(),
            t.scratch_bytes as f64 / 1024.0,
            t.path,
            t.max_rel_err
        ));
    }
    out.push_str(&format!(
        "| all layers (x count) | | | {} | {} | {} | {} | {:.2}x | | | |\n",
        ms(totals[0]),
        ms(totals[1]),
        ms(totals[2]),
        ms(totals[3]),
        (totals[0] + totals[1]) / (totals[2] + totals[3])
    ));
    out
}
