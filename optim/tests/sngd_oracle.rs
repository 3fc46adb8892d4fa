//! SNGD directions against the dense damped empirical Fisher built from per-sample gradients
//! obtained by running each sample alone through backward.
#![allow(clippy::disallowed_methods)] // Tests and examples read the device freely.

mod common;

use burn::module::AutodiffModule;
use burn::nn::conv::Conv2dConfig;
use burn::nn::{LinearConfig, PaddingConfig2d};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use common::*;
use faer::Mat;
use hylo_optim::capture::{CaptureHandle, CapturedConv2d, CapturedLinear};
use hylo_optim::factors::{per_sample_rows, ConvMode};
use hylo_optim::optimizer::LayerMeta;
use hylo_optim::precond::sngd;

/// Per-sample gradient of one layer as `[d_out, d_in']` flattened row-major.
fn flat(meta: &LayerMeta, grads: &GradientsParams) -> Vec<f64> {
    to_vec(meta.gradient::<IB>(grads).unwrap())
}

/// What turns a loss of `layer` into its parameter gradients (collecting captures when armed).
type ToGradients = Box<dyn Fn(Tensor<TB, 1>) -> GradientsParams>;

fn gradients_of<M: AutodiffModule<TB> + 'static>(
    layer: &M,
    capture: &CaptureHandle,
) -> ToGradients {
    let (layer, capture) = (layer.clone(), capture.clone());
    Box::new(move |l: Tensor<TB, 1>| capture.gradients::<TB, _>(l.backward(), &layer))
}

fn check_against_oracle<F>(
    n: usize,
    meta: LayerMeta,
    capture: &CaptureHandle,
    lambda: f64,
    loss_of: F,
    mode: ConvMode,
) where
    F: Fn(Option<usize>) -> (Tensor<TB, 1>, ToGradients),
{
    // Batch pass with capture.
    capture.arm(true);
    let (loss, to_grads) = loss_of(None);
    let grads = to_grads(loss);
    let captures = capture.take::<IB>();
    assert_eq!(captures.len(), 1);
    let rows = per_sample_rows(&captures[0], mode);
    let jac_rows = to_vec(rows.jacobian());
    let ghat_t = meta.gradient::<IB>(&grads).unwrap();
    let ghat = to_vec(ghat_t.clone());
    let v = to_vec(sngd::refresh(rows, lambda).unwrap().apply(ghat_t));

    // Oracle: one sample at a time (loss of one sample = l_i).
    let mut per_sample = Vec::new();
    for i in 0..n {
        capture.arm(false);
        let (loss, to_grads) = loss_of(Some(i));
        per_sample.push(flat(&meta, &to_grads(loss)));
    }
    let d = per_sample[0].len();
    let jac = Mat::from_fn(n, d, |i, j| per_sample[i][j]);
    let mean: Vec<f64> = (0..d)
        .map(|j| (0..n).map(|i| jac[(i, j)]).sum::<f64>() / n as f64)
        .collect();
    assert!(
        rel_err(&ghat, &mean) < 1e-5,
        "ghat differs from the mean of per-sample gradients"
    );
    if mode == ConvMode::Exact {
        let jac_err = rel_err(&jac_rows, &mat_to_vec(&jac));
        assert!(
            jac_err < 1e-5,
            "captured per-sample gradients differ: {jac_err}"
        );
    }
    let oracle = dense_ngd(&jac, &ghat, lambda);
    let err = rel_err(&v, &oracle);
    assert!(err <= 1e-4, "SNGD relative error {err}");
}

#[test]
fn sngd_linear_matches_dense_fisher() {
    let capture = CaptureHandle::new();
    let layer = CapturedLinear::<TB>::from_config(&LinearConfig::new(5, 3), &capture, &device());
    let meta = LayerMeta {
        weight_id: layer.inner.weight.id,
        bias_id: layer.inner.bias.as_ref().map(|b| b.id),
        geometry: layer.geometry(),
    };
    let n = 6;
    let x = tensor::<TB, 2>(1, [n, 5]);
    let t = tensor::<TB, 2>(2, [n, 3]);
    let loss_of = |sample: Option<usize>| {
        let (x, t) = match sample {
            None => (x.clone(), t.clone()),
            Some(i) => (x.clone().slice(i..i + 1), t.clone().slice(i..i + 1)),
        };
        let y = layer.forward(x);
        // l_i = sum_k sin(y_ik) * t_ik + 0.5 y_ik^2 (non-quadratic, so g_i varies per sample)
        let per = (y.clone().sin() * t + y.powi_scalar(2) * 0.5).sum_dim(1);
        let loss = per.mean();
        (loss, gradients_of(&layer, &capture))
    };
    check_against_oracle(n, meta, &capture, 0.05, loss_of, ConvMode::Exact);
}

#[test]
fn sngd_conv2d_exact_matches_dense_fisher() {
    let capture = CaptureHandle::new();
    let config = Conv2dConfig::new([2, 3], [3, 3])
        .with_stride([2, 1])
        .with_padding(PaddingConfig2d::Explicit(1, 2, 0, 1))
        .with_dilation([1, 2]);
    let layer = CapturedConv2d::<TB>::from_config(&config, &capture, &device()).unwrap();
    let n = 4;
    let x = tensor::<TB, 4>(3, [n, 2, 7, 6]);
    let meta = LayerMeta {
        weight_id: layer.inner.weight.id,
        bias_id: layer.inner.bias.as_ref().map(|b| b.id),
        geometry: layer.geometry(7, 6),
    };
    let loss_of = |sample: Option<usize>| {
        let x = match sample {
            None => x.clone(),
            Some(i) => x.clone().slice(i..i + 1),
        };
        let y = layer.forward(x);
        let [b, c, h, w] = y.dims();
        let per = (y.clone().sin() + y.powi_scalar(2) * 0.3)
            .reshape([b, c * h * w])
            .sum_dim(1);
        let loss = per.mean();
        (loss, gradients_of(&layer, &capture))
    };
    check_against_oracle(n, meta, &capture, 10.0, loss_of, ConvMode::Exact);
}

#[test]
fn sngd_conv2d_same_padding_exact_matches_dense_fisher() {
    let capture = CaptureHandle::new();
    let config = Conv2dConfig::new([2, 2], [3, 3])
        .with_stride([2, 2])
        .with_padding(PaddingConfig2d::Same)
        .with_bias(false);
    let layer = CapturedConv2d::<TB>::from_config(&config, &capture, &device()).unwrap();
    let n = 3;
    let x = tensor::<TB, 4>(4, [n, 2, 6, 6]);
    let meta = LayerMeta {
        weight_id: layer.inner.weight.id,
        bias_id: None,
        geometry: layer.geometry(6, 6),
    };
    let loss_of = |sample: Option<usize>| {
        let x = match sample {
            None => x.clone(),
            Some(i) => x.clone().slice(i..i + 1),
        };
        let y = layer.forward(x);
        let [b, c, h, w] = y.dims();
        let loss = (y.clone().cos() + y * 0.5)
            .reshape([b, c * h * w])
            .sum_dim(1)
            .mean();
        (loss, gradients_of(&layer, &capture))
    };
    check_against_oracle(n, meta, &capture, 0.1, loss_of, ConvMode::Exact);
}
