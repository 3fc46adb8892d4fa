//! Per-layer factor extraction: from a layer's captured input and output gradient to the
//! per-sample rows (SNGD, HyLo) or the Kronecker factors (K-FAC), as in ALGORITHMS.md.

use burn::tensor::ops::PadMode;
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use crate::capture::{CapturedInput, LayerCapture, LayerGeometry};
use crate::rows::PerSampleRows;

/// How the per-sample gradient of a convolution is represented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ConvMode {
    /// The HyLo paper's code: a_i and g_i are averaged over output positions (cheap, approximate;
    /// about 1/L of the per-sample gradient, so the curvature is about 1/L^2 of its scale).
    SpatialMean,
    /// `SpatialMean` rows at the gradient's scale: a_i averaged and g_i summed over the L output
    /// positions (L times the `SpatialMean` row; the exact per-sample gradient when a and g are
    /// constant over positions). As cheap as `SpatialMean`. The default.
    #[default]
    GradientScale,
    /// The true per-sample gradient sum_l g_il a_il^T, materialised per sample.
    Exact,
}

impl ConvMode {
    /// The name used on command lines and in reports (`spatial-mean`, `gradient-scale`, `exact`).
    pub fn name(self) -> &'static str {
        match self {
            Self::SpatialMean => "spatial-mean",
            Self::GradientScale => "gradient-scale",
            Self::Exact => "exact",
        }
    }
}

impl std::str::FromStr for ConvMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [Self::SpatialMean, Self::GradientScale, Self::Exact]
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("expected spatial-mean, gradient-scale or exact, got `{s}`"))
    }
}

/// A layer's data at every output position: inputs `[n, L, d_in']` (bias column included) and
/// output gradients `[n, L, d_out]` scaled by n (so that they are dl_i/dy_i).
pub struct PositionRows<B: Backend> {
    /// Layer inputs per sample and position, with a trailing 1 when the layer has a bias.
    pub a: Tensor<B, 3>,
    /// Per-sample output gradients per position.
    pub g: Tensor<B, 3>,
}

/// The convolution input with its `[top, bottom, left, right]` zero padding applied.
fn zero_padded<B: Backend>(x: &Tensor<B, 4>, padding: [usize; 4]) -> Tensor<B, 4> {
    let [top, bottom, left, right] = padding;
    if top + bottom + left + right > 0 {
        x.clone()
            .pad([(top, bottom), (left, right)], PadMode::Constant(0.0))
    } else {
        x.clone()
    }
}

/// The patches of a convolution input, `[n, C k_h k_w, L]` in `unfold4d`'s order (channel, then
/// kernel row, then kernel column), from `k_h k_w` strided slices of the zero-padded input.
///
/// Burn 0.21's `unfold4d` is a convolution with a one-hot kernel: `2 (C k k)^2 L n` flops where a
/// copy of `C k k L n` values suffices (66 GFlop for one 512-channel 3x3 layer of ResNet-50 at
/// batch 32).
pub fn unfold_patches<B: Backend>(
    x: &Tensor<B, 4>,
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    padding: [usize; 4],
) -> Tensor<B, 3> {
    let [n, c, _, _] = x.dims();
    let x = zero_padded(x, padding);
    let [_, _, hp, wp] = x.dims();
    let out_h = (hp - dilation[0] * (kernel[0] - 1) - 1) / stride[0] + 1;
    let out_w = (wp - dilation[1] * (kernel[1] - 1) - 1) / stride[1] + 1;
    let mut offsets = Vec::with_capacity(kernel[0] * kernel[1]);
    for u in 0..kernel[0] {
        for v in 0..kernel[1] {
            let (r0, c0) = (u * dilation[0], v * dilation[1]);
            let patch = x.clone().slice(burn::tensor::s![
                ..,
                ..,
                r0..r0 + (out_h - 1) * stride[0] + 1;stride[0] as isize,
                c0..c0 + (out_w - 1) * stride[1] + 1;stride[1] as isize
            ]);
            offsets.push(patch.reshape([n, c, 1, out_h * out_w]));
        }
    }
    Tensor::cat(offsets, 2).reshape([n, c * kernel[0] * kernel[1], out_h * out_w])
}

/// A capture's inputs and output gradients by position: `[n, L, d_in]` and `[n, L, d_out]`
/// (a convolution's inputs are its unfolded patches; a linear layer has its L positions).
fn by_position<B: Backend>(capture: &LayerCapture<B>) -> (Tensor<B, 3>, Tensor<B, 3>) {
    match (&capture.input, &capture.geometry) {
        (CapturedInput::Linear(x), LayerGeometry::Linear { .. }) => {
            (x.clone(), capture.output_grad.clone())
        }
        (
            CapturedInput::Conv(x),
            LayerGeometry::Conv2d {
                kernel,
                stride,
                dilation,
                padding,
                ..
            },
        ) => {
            let patches = unfold_patches(x, *kernel, *stride, *dilation, *padding);
            // [n, C k k, L] -> [n, L, C k k];  [n, d_out, L] -> [n, L, d_out]
            (
                patches.swap_dims(1, 2),
                capture.output_grad.clone().swap_dims(1, 2),
            )
        }
        _ => unreachable!("capture input kind always matches its geometry"),
    }
}

/// Unfolds and scales a capture into per-position rows.
pub fn position_rows<B: Backend>(capture: &LayerCapture<B>) -> PositionRows<B> {
    let [n, _, _] = capture.output_grad.dims();
    let (a, g) = by_position(capture);
    let g = g * n as f64;
    let a = if capture.geometry.has_bias() {
        let [n, l, _] = a.dims();
        let ones = Tensor::ones([n, l, 1], &a.device());
        Tensor::cat(vec![a, ones], 2)
    } else {
        a
    };
    PositionRows { a, g }
}

/// Per-sample rows of a layer for SNGD and HyLo.
///
/// Linear layers (one position), `SpatialMean` and `GradientScale` convolutions give Kronecker
/// rows; `Exact` convolutions give the materialised per-sample gradients.
pub fn per_sample_rows<B: Backend>(capture: &LayerCapture<B>, mode: ConvMode) -> PerSampleRows<B> {
    if let (ConvMode::SpatialMean | ConvMode::GradientScale, CapturedInput::Conv(x)) =
        (mode, &capture.input)
    {
        return spatial_mean_rows(x, capture, mode == ConvMode::GradientScale);
    }
    let PositionRows { a, g } = position_rows(capture);
    let [n, positions, d_in] = a.dims();
    let d_out = g.dims()[2];
    if positions == 1 {
        return PerSampleRows::Kronecker {
            a: a.reshape([n, d_in]),
            g: g.reshape([n, d_out]),
        };
    }
    match mode {
        ConvMode::SpatialMean => PerSampleRows::Kronecker {
            a: a.mean_dim(1).reshape([n, d_in]),
            g: g.mean_dim(1).reshape([n, d_out]),
        },
        ConvMode::GradientScale => PerSampleRows::Kronecker {
            a: a.mean_dim(1).reshape([n, d_in]),
            g: g.sum_dim(1).reshape([n, d_out]),
        },
        ConvMode::Exact => {
            // J_i = sum_l g_il a_il^T = g_i^T a_i : [n, d_out, L] x [n, L, d_in']
            let j = g.swap_dims(1, 2).matmul(a);
            PerSampleRows::Dense {
                j: j.reshape([n, d_out * d_in]),
                d_out,
            }
        }
    }
}

/// `SpatialMean` rows of a convolution without unfolding: the mean over output positions of the
/// patch entry (c, u, v) is the mean of the padded input over a strided sub-grid. The sub-grid
/// sums are separable: a strided row sum per kernel row ([`kernel_row_sums`], from one pass over
/// the input), then a strided column sum of that per kernel offset (no `[n, C k k, L]`
/// intermediate; the input is copied only when the stride does not divide its height). With
/// `gradient_scale` the output gradient is summed over positions instead of averaged.
fn spatial_mean_rows<B: Backend>(
    x: &Tensor<B, 4>,
    capture: &LayerCapture<B>,
    gradient_scale: bool,
) -> PerSampleRows<B> {
    let LayerGeometry::Conv2d {
        kernel,
        stride,
        dilation,
        padding,
        bias,
        ..
    } = &capture.geometry
    else {
        unreachable!("capture input kind always matches its geometry")
    };
    let [n, d_out, positions] = capture.output_grad.dims();
    let [_, channels, h, w] = x.dims();
    let [top, bottom, left, right] = *padding;
    let out_h = (h + top + bottom - dilation[0] * (kernel[0] - 1) - 1) / stride[0] + 1;
    let wp = w + left + right;
    let out_w = (wp - dilation[1] * (kernel[1] - 1) - 1) / stride[1] + 1;
    debug_assert_eq!(out_h * out_w, positions);
    let row_sums = kernel_row_sums(x, top, kernel[0], dilation[0], stride[0], out_h);
    let mut offsets = Vec::with_capacity(kernel[0] * kernel[1]);
    for rows in row_sums {
        // Zero columns of the padding, on the small [n, C, 1, W] sums only.
        let rows = rows
            .reshape([n, channels, 1, w])
            .pad([(0, 0), (left, right)], PadMode::Constant(0.0));
        for v in 0..kernel[1] {
            let c0 = v * dilation[1];
            let cols = rows.clone().slice(burn::tensor::s![
                ..,
                ..,
                ..,
                c0..c0 + (out_w - 1) * stride[1] + 1;stride[1] as isize
            ]);
            offsets.push(cols.sum_dim(3).reshape([n, channels, 1]));
        }
    }
    // Columns in unfold's order: channel-major, then kernel row, then kernel column.
    let a =
        Tensor::cat(offsets, 2).reshape([n, channels * kernel[0] * kernel[1]]) / positions as f64;
    let a = if *bias {
        Tensor::cat(vec![a, Tensor::ones([n, 1], &x.device())], 1)
    } else {
        a
    };
    let g = if gradient_scale {
        capture.output_grad.clone().sum_dim(2)
    } else {
        capture.output_grad.clone().mean_dim(2)
    };
    let g = g.reshape([n, d_out]) * n as f64;
    PerSampleRows::Kronecker { a, g }
}

/// For each kernel row u, the sum over output rows of the input row each reads: rows
/// `u * dilation - top + stride * k` for `k in 0..out_h` that lie inside the input (the others
/// are zero padding); `[n, C, W]` each.
///
/// Those rows are one residue class modulo the stride, cut at both ends. All residue classes
/// are summed in one pass over the input; each kernel row then subtracts the few rows of its
/// class outside its range, or sums its rows directly when that is cheaper.
fn kernel_row_sums<B: Backend>(
    x: &Tensor<B, 4>,
    top: usize,
    kernel_rows: usize,
    dilation: usize,
    stride: usize,
    out_h: usize,
) -> Vec<Tensor<B, 3>> {
    let [n, channels, h, w] = x.dims();
    let row = |r: usize| x.clone().narrow(2, r, 1).reshape([n, channels, w]);
    // Rows of each residue class, summed: [n, C, stride, W] (zero rows complete the last block).
    let blocks = h.div_ceil(stride);
    let extended = if blocks * stride > h {
        x.clone()
            .pad([(0, blocks * stride - h), (0, 0)], PadMode::Constant(0.0))
    } else {
        x.clone()
    };
    let classes = extended
        .reshape([n, channels, blocks, stride * w])
        .sum_dim(2)
        .reshape([n, channels, stride, w]);
    (0..kernel_rows)
        .map(|u| {
            // Input rows read by kernel row u: first..=last in steps of `stride`.
            let first = (u * dilation) as isize - top as isize;
            let last = first + (stride * (out_h - 1)) as isize;
            let class = first.rem_euclid(stride as isize) as usize;
            let lo = if first >= 0 { first as usize } else { class };
            let hi = (last.min(h as isize - 1) - class as isize).div_euclid(stride as isize);
            let hi = class as isize + hi * stride as isize;
            if hi < lo as isize {
                return Tensor::zeros([n, channels, w], &x.device());
            }
            let hi = hi as usize;
            let included = (hi - lo) / stride + 1;
            let excluded: Vec<usize> = (class..h)
                .step_by(stride)
                .filter(|&r| r < lo || r > hi)
                .collect();
            if excluded.len() < included {
                let all = classes
                    .clone()
                    .narrow(2, class, 1)
                    .reshape([n, channels, w]);
                excluded.into_iter().fold(all, |sum, r| sum - row(r))
            } else {
                x.clone()
                    .slice(burn::tensor::s![.., .., lo..hi + 1;stride as isize, ..])
                    .sum_dim(2)
                    .reshape([n, channels, w])
            }
        })
        .collect()
}

/// K-FAC factors of one batch: `A = (1/(nL)) sum a a^T` and `G = (1/n) sum g g^T`.
///
/// For convolutions the expectation over positions follows KFC: A averages over samples and
/// positions, G sums over positions and averages over samples, so that `A kron G` approximates
/// the per-sample Fisher `E_i[vec(J_i) vec(J_i)^T]`. With one position and one sample they are
/// exactly `a a^T` and `g g^T`.
pub fn kfac_factors<B: Backend>(capture: &LayerCapture<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let n = capture.output_grad.dims()[0];
    let d_out = capture.geometry.d_out();
    // Columns are (sample, position) pairs: A = X X^T / (nL), G = Y Y^T / n with X [d_in', nL]
    // and Y [d_out, nL], one GEMM each (the transposed operand is a view).
    let (a, g) = by_position(capture);
    let [_, l, d] = a.dims();
    let x = a.reshape([n * l, d]).transpose();
    let y = g.reshape([n * l, d_out]).transpose();
    let x = if capture.geometry.has_bias() {
        let cols = x.dims()[1];
        Tensor::cat(
            vec![x, Tensor::ones([1, cols], &capture.output_grad.device())],
            0,
        )
    } else {
        x
    };
    let cols = x.dims()[1];
    // The output gradient as backward gives it is dL/dy = g / n.
    let y = y * n as f64;
    let a_factor = x.clone().matmul(x.transpose()) / cols as f64;
    let g_factor = y.clone().matmul(y.transpose()) / n as f64;
    (a_factor, g_factor)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests read freely.
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::module::ParamId;
    use burn::tensor::Distribution;

    fn rows_of(rows: PerSampleRows<Flex>) -> (Vec<f32>, Vec<f32>) {
        match rows {
            PerSampleRows::Kronecker { a, g } => (
                a.into_data().to_vec().unwrap(),
                g.into_data().to_vec().unwrap(),
            ),
            PerSampleRows::Dense { .. } => panic!("SpatialMean gives Kronecker rows"),
        }
    }

    #[test]
    fn patches_equal_burns_unfold() {
        use burn::tensor::module::unfold4d;
        use burn::tensor::ops::UnfoldOptions;
        let device = Default::default();
        for (kernel, stride, dilation, padding, hw) in [
            ([3, 3], [1, 1], [1, 1], [1, 1, 1, 1], [7, 6]),
            ([3, 2], [2, 1], [1, 2], [2, 2, 1, 1], [9, 8]),
            ([1, 1], [2, 2], [1, 1], [0, 0, 0, 0], [5, 5]),
            ([5, 3], [3, 2], [2, 1], [2, 2, 0, 0], [13, 10]),
            ([7, 7], [2, 2], [1, 1], [3, 3, 3, 3], [12, 11]),
        ] {
            let x = Tensor::<Flex, 4>::random(
                [2, 3, hw[0], hw[1]],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            // unfold4d pads symmetrically: compare on symmetric paddings.
            let expected = unfold4d(
                x.clone(),
                kernel,
                UnfoldOptions::new(stride, [padding[0], padding[2]], dilation),
            );
            let got = unfold_patches(&x, kernel, stride, dilation, padding);
            assert_eq!(got.dims(), expected.dims(), "{kernel:?} {stride:?}");
            let diff: f32 = (got - expected).abs().max().into_scalar();
            assert_eq!(diff, 0.0, "{kernel:?} {stride:?} {dilation:?}");
        }
    }

    #[test]
    fn spatial_mean_without_unfold_equals_the_mean_of_unfolded_patches() {
        let device = Default::default();
        for (kernel, stride, dilation, padding, bias, hw) in [
            ([3, 3], [1, 1], [1, 1], [1, 1, 1, 1], true, [7, 6]),
            ([3, 2], [2, 1], [1, 2], [0, 1, 2, 0], false, [9, 8]),
            ([1, 1], [2, 2], [1, 1], [0, 0, 0, 0], true, [5, 5]),
            ([7, 7], [2, 2], [1, 1], [3, 3, 3, 3], false, [12, 12]),
            // A stride that does not divide the height, rows cut off at both ends.
            ([5, 3], [3, 2], [2, 1], [2, 0, 1, 1], true, [13, 10]),
            ([2, 2], [3, 3], [1, 1], [0, 0, 0, 0], false, [11, 7]),
            // Kernel rows that read only padding.
            ([5, 1], [1, 1], [1, 1], [3, 0, 0, 0], false, [2, 3]),
        ] {
            let (n, c, d_out) = (3, 2, 4);
            let geometry = LayerGeometry::Conv2d {
                channels_in: c,
                channels_out: d_out,
                kernel,
                stride,
                dilation,
                padding,
                bias,
            };
            let hp = hw[0] + padding[0] + padding[1];
            let wp = hw[1] + padding[2] + padding[3];
            let oh = (hp - dilation[0] * (kernel[0] - 1) - 1) / stride[0] + 1;
            let ow = (wp - dilation[1] * (kernel[1] - 1) - 1) / stride[1] + 1;
            let normal = Distribution::Normal(0.0, 1.0);
            let capture = LayerCapture::<Flex> {
                weight_id: ParamId::new(),
                bias_id: None,
                geometry,
                input: CapturedInput::Conv(Tensor::random([n, c, hw[0], hw[1]], normal, &device)),
                output_grad: Tensor::random([n, d_out, oh * ow], normal, &device),
            };
            let PositionRows { a, g } = position_rows(&capture);
            let d_in = a.dims()[2];
            let expected = (
                a.mean_dim(1)
                    .reshape([n, d_in])
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap(),
                g.mean_dim(1)
                    .reshape([n, d_out])
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap(),
            );
            let got = rows_of(per_sample_rows(&capture, ConvMode::SpatialMean));
            for (x, y) in got
                .0
                .iter()
                .zip(&expected.0)
                .chain(got.1.iter().zip(&expected.1))
            {
                assert!(
                    (x - y).abs() < 1e-5 * (1.0 + y.abs()),
                    "{kernel:?} {stride:?}: {x} vs {y}"
                );
            }
            assert_eq!(
                (got.0.len(), got.1.len()),
                (expected.0.len(), expected.1.len())
            );
        }
    }

    /// A convolution capture with random input and output gradient (or constant over positions).
    fn conv_capture(
        n: usize,
        c: usize,
        d_out: usize,
        hw: [usize; 2],
        constant: bool,
    ) -> LayerCapture<Flex> {
        let device = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        let (kernel, stride) = ([3, 2], [2, 1]);
        let (oh, ow) = ((hw[0] - 3) / 2 + 1, hw[1] - 1);
        let (input, output_grad) = if constant {
            (
                Tensor::<Flex, 4>::random([n, c, 1, 1], normal, &device)
                    .expand([n, c, hw[0], hw[1]]),
                Tensor::<Flex, 3>::random([n, d_out, 1], normal, &device).expand([
                    n,
                    d_out,
                    oh * ow,
                ]),
            )
        } else {
            (
                Tensor::random([n, c, hw[0], hw[1]], normal, &device),
                Tensor::random([n, d_out, oh * ow], normal, &device),
            )
        };
        LayerCapture {
            weight_id: ParamId::new(),
            bias_id: Some(ParamId::new()),
            geometry: LayerGeometry::Conv2d {
                channels_in: c,
                channels_out: d_out,
                kernel,
                stride,
                dilation: [1, 1],
                padding: [0, 0, 0, 0],
                bias: true,
            },
            input: CapturedInput::Conv(input),
            output_grad,
        }
    }

    fn max_relative_diff(x: Tensor<Flex, 2>, y: Tensor<Flex, 2>) -> f32 {
        let scale: f32 = y.clone().abs().max().into_scalar();
        let diff: f32 = (x - y).abs().max().into_scalar();
        diff / scale
    }

    #[test]
    fn gradient_scale_rows_are_the_exact_per_sample_gradients_when_nothing_varies_over_positions() {
        let capture = conv_capture(4, 3, 5, [7, 6], true);
        let exact = per_sample_rows(&capture, ConvMode::Exact).jacobian();
        let scaled = per_sample_rows(&capture, ConvMode::GradientScale).jacobian();
        assert!(max_relative_diff(scaled, exact.clone()) < 1e-5);
        // The paper's rows are 1/L of it (L = 3 x 5 positions here).
        let mean = per_sample_rows(&capture, ConvMode::SpatialMean).jacobian();
        assert!(max_relative_diff(mean * 15.0, exact) < 1e-5);
    }

    #[test]
    fn gradient_scale_rows_are_l_times_spatial_mean_rows() {
        let capture = conv_capture(3, 2, 4, [9, 5], false);
        let mean = per_sample_rows(&capture, ConvMode::SpatialMean).jacobian();
        let scaled = per_sample_rows(&capture, ConvMode::GradientScale).jacobian();
        let positions = capture.output_grad.dims()[2] as f64;
        assert!(max_relative_diff(scaled, mean * positions) < 1e-5);
        // And not the exact per-sample gradients once the data varies over positions.
        let exact = per_sample_rows(&capture, ConvMode::Exact).jacobian();
        let scaled = per_sample_rows(&capture, ConvMode::GradientScale).jacobian();
        assert!(max_relative_diff(scaled, exact) > 1e-2);
    }

    #[test]
    fn conv_modes_parse_by_name() {
        for mode in [
            ConvMode::SpatialMean,
            ConvMode::GradientScale,
            ConvMode::Exact,
        ] {
            assert_eq!(mode.name().parse::<ConvMode>(), Ok(mode));
        }
        assert!("mean"
            .parse::<ConvMode>()
            .unwrap_err()
            .contains("gradient-scale"));
    }
}
