//! The CPU convolution of `CapturedConv2d` (matrix products, `hylo_optim::gemm_conv`) against
//! Burn's `Conv2d`: outputs and the gradients of input, weight and bias to 1e-5 in f32, for
//! strides, paddings (asymmetric and `Same`), dilations, kernel sizes, with and without bias,
//! and strides that do not divide the input.

mod common;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::Tensor;
use common::*;
use hylo_optim::{CaptureHandle, CapturedConv2d};

struct Case {
    channels: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    padding: PaddingConfig2d,
    bias: bool,
    input: [usize; 4],
}

fn check(case: &Case, seed: u64) {
    let dev = device();
    let conv: Conv2d<TB> = {
        let _rng = rng_lock();
        let conv = Conv2dConfig::new(case.channels, case.kernel)
            .with_stride(case.stride)
            .with_dilation(case.dilation)
            .with_padding(case.padding.clone())
            .with_bias(case.bias)
            .init(&dev);
        conv.clone().load_record(conv.into_record())
    };
    let capture = CaptureHandle::new();
    let wrapped = CapturedConv2d::new(conv.clone(), &capture).unwrap();
    let x = tensor::<TB, 4>(seed, case.input).require_grad();
    let x2 = x.clone().detach().require_grad();
    let plain = conv.forward(x.clone());
    let ours = wrapped.forward(x2.clone());
    assert_eq!(plain.dims(), ours.dims());
    let label = format!(
        "kernel {:?} stride {:?} dilation {:?} padding {:?} bias {} input {:?}",
        case.kernel, case.stride, case.dilation, case.padding, case.bias, case.input
    );
    let err = rel_err(&to_vec(ours.clone()), &to_vec(plain.clone()));
    assert!(err < 1e-5, "output: {err} ({label})");
    // A loss whose output gradient varies everywhere.
    let weights = tensor::<TB, 4>(seed + 1, plain.dims());
    let g_plain = (plain * weights.clone()).sum().backward();
    let g_ours = (ours * weights).sum().backward();
    let pairs: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
        (
            "input",
            to_vec(x.grad(&g_plain).unwrap()),
            to_vec(x2.grad(&g_ours).unwrap()),
        ),
        (
            "weight",
            to_vec(conv.weight.val().grad(&g_plain).unwrap()),
            to_vec(wrapped.inner.weight.val().grad(&g_ours).unwrap()),
        ),
    ];
    for (what, expected, got) in pairs {
        let err = rel_err(&got, &expected);
        assert!(err < 1e-5, "{what} gradient: {err} ({label})");
    }
    if case.bias {
        let expected = to_vec(conv.bias.as_ref().unwrap().val().grad(&g_plain).unwrap());
        let got = to_vec(
            wrapped
                .inner
                .bias
                .as_ref()
                .unwrap()
                .val()
                .grad(&g_ours)
                .unwrap(),
        );
        let err = rel_err(&got, &expected);
        assert!(err < 1e-5, "bias gradient: {err} ({label})");
    }
}

#[test]
fn gemm_convolution_matches_burns_conv2d_in_output_and_gradients() {
    let cases = [
        // ResNet's 3x3 convolutions, stride 1 and 2.
        Case {
            channels: [3, 4],
            kernel: [3, 3],
            stride: [1, 1],
            dilation: [1, 1],
            padding: PaddingConfig2d::Explicit(1, 1, 1, 1),
            bias: false,
            input: [2, 3, 8, 8],
        },
        Case {
            channels: [4, 6],
            kernel: [3, 3],
            stride: [2, 2],
            dilation: [1, 1],
            padding: PaddingConfig2d::Explicit(1, 1, 1, 1),
            bias: true,
            input: [3, 4, 8, 8],
        },
        // A stride that does not divide the input, asymmetric padding.
        Case {
            channels: [2, 5],
            kernel: [3, 2],
            stride: [2, 3],
            dilation: [1, 1],
            padding: PaddingConfig2d::Explicit(2, 0, 1, 1),
            bias: true,
            input: [2, 2, 9, 11],
        },
        // Dilation, with and without stride.
        Case {
            channels: [3, 3],
            kernel: [3, 3],
            stride: [1, 1],
            dilation: [2, 2],
            padding: PaddingConfig2d::Explicit(2, 2, 2, 2),
            bias: true,
            input: [2, 3, 7, 9],
        },
        Case {
            channels: [3, 2],
            kernel: [3, 3],
            stride: [2, 2],
            dilation: [2, 1],
            padding: PaddingConfig2d::Explicit(1, 0, 2, 1),
            bias: false,
            input: [2, 3, 10, 7],
        },
        // 1x1 (projection shortcuts), strided; ResNet-50's 7x7 stem.
        Case {
            channels: [6, 4],
            kernel: [1, 1],
            stride: [2, 2],
            dilation: [1, 1],
            padding: PaddingConfig2d::Valid,
            bias: false,
            input: [2, 6, 7, 7],
        },
        Case {
            channels: [3, 4],
            kernel: [7, 7],
            stride: [2, 2],
            dilation: [1, 1],
            padding: PaddingConfig2d::Explicit(3, 3, 3, 3),
            bias: false,
            input: [2, 3, 15, 13],
        },
        // Burn's `Same` padding; no padding; a kernel as large as the input.
        Case {
            channels: [2, 3],
            kernel: [3, 3],
            stride: [1, 1],
            dilation: [1, 1],
            padding: PaddingConfig2d::Same,
            bias: true,
            input: [2, 2, 6, 5],
        },
        Case {
            channels: [2, 3],
            kernel: [2, 2],
            stride: [1, 1],
            dilation: [1, 1],
            padding: PaddingConfig2d::Valid,
            bias: true,
            input: [1, 2, 5, 4],
        },
        Case {
            channels: [2, 3],
            kernel: [4, 3],
            stride: [1, 1],
            dilation: [1, 1],
            padding: PaddingConfig2d::Valid,
            bias: true,
            input: [2, 2, 4, 3],
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        check(case, 10 * i as u64 + 3);
    }
}

#[test]
fn the_curvature_capture_sees_the_same_output_gradient() {
    // An armed pass adds the probe to the matrix-product output: its gradient is dL/dy.
    let dev = device();
    let capture = CaptureHandle::new();
    let conv: Conv2d<TB> = {
        let _rng = rng_lock();
        Conv2dConfig::new([2, 3], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&dev)
    };
    let wrapped = CapturedConv2d::new(conv, &capture).unwrap();
    let x = tensor::<TB, 4>(5, [2, 2, 6, 6]);
    capture.arm(true);
    let y = wrapped.forward(x);
    let weights = tensor::<TB, 4>(6, y.dims());
    let grads = (y * weights.clone()).sum().backward();
    capture.collect::<TB>(&grads);
    let captured = capture.take::<IB>();
    assert_eq!(captured.len(), 1);
    let expected: Tensor<IB, 3> = weights.inner().reshape([2, 3, 36]);
    assert_eq!(to_vec(captured[0].output_grad.clone()), to_vec(expected));
}
