//! The CPU convolution of `CapturedConv2d` (matrix products, `hylo_optim::gemm_conv`) against
//! Burn's `Conv2d`: outputs and the gradients of input, weight and bias to 1e-5 in f32, for
//! strides, paddings (asymmetric and `Same`), dilations, kernel sizes, with and without bias,
//! strides that do not divide the input, and the models' own shapes on more threads than two
//! (batches larger and smaller than the thread count). Each check asserts which implementation
//! ran, so a silent fallback to Burn cannot pass as agreement; shapes the matrix products cannot
//! compute go to Burn, which reports them.
#![allow(clippy::disallowed_methods)] // Tests and examples read the device freely.

mod common;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::Tensor;
use common::*;
use hylo_optim::gemm_conv::kernels::{self, ConvShape};
use hylo_optim::gemm_conv::{last_path, ConvPath};
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
    check_path(case, seed, ConvPath::Gemm);
}

/// Checks `case` against Burn's `Conv2d`, asserting that `CapturedConv2d` took `path`.
fn check_path(case: &Case, seed: u64, path: ConvPath) {
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
        "channels {:?} kernel {:?} stride {:?} dilation {:?} padding {:?} bias {} input {:?} \
         ({} threads)",
        case.channels,
        case.kernel,
        case.stride,
        case.dilation,
        case.padding,
        case.bias,
        case.input,
        rayon::current_num_threads()
    );
    assert_eq!(last_path(), Some(path), "{label}");
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

/// A 3x3 (padding 1) or 1x1 (no padding) convolution case of `c -> co` channels.
fn model_case(c: usize, co: usize, k: usize, stride: usize, n: usize, side: usize) -> Case {
    Case {
        channels: [c, co],
        kernel: [k, k],
        stride: [stride, stride],
        dilation: [1, 1],
        padding: if k == 3 {
            PaddingConfig2d::Explicit(1, 1, 1, 1)
        } else {
            PaddingConfig2d::Valid
        },
        bias: k == 1,
        input: [n, c, side, side],
    }
}

#[test]
fn the_models_shapes_agree_on_four_threads_for_large_and_small_batches() {
    // Four threads (CI machines have two): batch 2 x 4 + 1 = 9 splits samples over the tasks,
    // batches 1 and 2 split each sample's channels.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    pool.install(|| {
        assert_eq!(rayon::current_num_threads(), 4);
        for n in [9, 2, 1] {
            let cases = [
                // ResNet basic blocks: 64 -> 64 at strides 1 and 2.
                (model_case(64, 64, 3, 1, n, 8), ConvPath::Gemm),
                (model_case(64, 64, 3, 2, n, 8), ConvPath::Gemm),
                // ResNet-50's strided projection shortcut.
                (model_case(256, 512, 1, 2, n, 8), ConvPath::Gemm),
                // The U-Net's first, middle and deepest convolutions (the deepest, 3x3 over 512
                // channels on 8x8, is one where Burn's kernel is faster: routed there).
                (model_case(3, 32, 3, 1, n, 16), ConvPath::Gemm),
                (model_case(32, 64, 3, 1, n, 16), ConvPath::Gemm),
                (model_case(512, 256, 3, 1, n, 8), ConvPath::Burn),
            ];
            for (i, (case, path)) in cases.iter().enumerate() {
                check_path(case, 100 + 10 * i as u64 + n as u64, *path);
            }
        }
    });
}

#[test]
fn shapes_the_matrix_products_cannot_compute_go_to_burn_which_reports_them() {
    let dev = device();
    let capture = CaptureHandle::new();
    let conv = |channels: [usize; 2], kernel: [usize; 2], dilation: [usize; 2]| {
        let _rng = rng_lock();
        let inner = Conv2dConfig::new(channels, kernel)
            .with_dilation(dilation)
            .init::<TB>(&dev);
        // Drawn now: a clone of lazily initialised parameters draws its own values.
        let inner = inner.clone().load_record(inner.into_record());
        CapturedConv2d::new(inner, &capture).unwrap()
    };
    // A weight of 3 input channels on an input of 2, and of 3 on 5: Burn panics with its
    // message; the matrix products never read past a buffer.
    for channels_in in [2, 5] {
        let layer = conv([3, 4], [3, 3], [1, 1]);
        let x = tensor::<TB, 4>(1, [2, channels_in, 6, 6]);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| layer.forward(x)));
        assert!(result.is_err(), "{channels_in} input channels");
        assert_eq!(last_path(), Some(ConvPath::Burn));
    }
    // An input smaller than the dilated kernel (5x5 spans 9): no underflow.
    let layer = conv([2, 2], [5, 5], [2, 2]);
    let x = tensor::<TB, 4>(2, [1, 2, 6, 6]);
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| layer.forward(x)));
    assert_eq!(last_path(), Some(ConvPath::Burn));
    // Groups changed after construction: Burn's grouped convolution, with its result.
    let mut layer = conv([4, 6], [3, 3], [1, 1]);
    let mut plain = layer.inner.clone();
    plain.groups = 2;
    let grouped = Conv2dConfig::new([4, 6], [3, 3])
        .with_groups(2)
        .init::<TB>(&dev);
    let weight = tensor::<TB, 4>(3, grouped.weight.dims());
    plain.weight = burn::module::Param::from_tensor(weight.clone());
    layer.inner = plain.clone();
    let x = tensor::<TB, 4>(4, [2, 4, 6, 6]);
    let ours = layer.forward(x.clone());
    assert_eq!(last_path(), Some(ConvPath::Burn));
    assert_eq!(to_vec(ours), to_vec(plain.forward(x)));
}

#[test]
fn the_raw_kernels_refuse_shapes_and_buffers_that_do_not_fit() {
    let shape = |input: [usize; 4], weight: [usize; 4], dilation: [usize; 2]| {
        ConvShape::new(input, weight, [1, 1], dilation, [0, 0, 0, 0])
    };
    assert!(shape([1, 2, 6, 6], [3, 3, 3, 3], [1, 1])
        .unwrap_err()
        .contains("input channels"));
    assert!(shape([1, 2, 6, 6], [3, 2, 5, 5], [2, 2])
        .unwrap_err()
        .contains("does not fit"));
    assert!(shape([1, 2, 6, 6], [3, 2, 3, 3], [0, 1]).is_err());
    let ok = shape([2, 2, 6, 6], [3, 2, 3, 3], [1, 1]).unwrap();
    let x = vec![0.0; ok.input_len()];
    let w = vec![0.0; ok.weight_len()];
    let short_input = std::panic::catch_unwind(|| kernels::forward(&ok, &x[1..], &w, None));
    let long_weight = std::panic::catch_unwind(|| {
        let w = vec![0.0; ok.weight_len() + 1];
        kernels::forward(&ok, &x, &w, None)
    });
    let short_dy = std::panic::catch_unwind(|| {
        kernels::backward(&ok, &x, &w, &vec![0.0; ok.output_len() - 1], [true; 3])
    });
    assert!(short_input.is_err() && long_weight.is_err() && short_dy.is_err());
    assert_eq!(kernels::forward(&ok, &x, &w, None).len(), ok.output_len());
}
