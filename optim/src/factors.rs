//! Per-layer factor extraction: from a layer's captured input and output gradient to the
//! per-sample rows (SNGD, HyLo) or the Kronecker factors (K-FAC), as in ALGORITHMS.md.

use burn::tensor::module::unfold4d;
use burn::tensor::ops::{PadMode, UnfoldOptions};
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use crate::capture::{CapturedInput, LayerCapture, LayerGeometry};
use crate::rows::PerSampleRows;

/// How the per-sample gradient of a convolution is represented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ConvMode {
    /// The HyLo paper's code: a_i and g_i are averaged over output positions (cheap, approximate).
    #[default]
    SpatialMean,
    /// The true per-sample gradient sum_l g_il a_il^T, materialised per sample.
    Exact,
}

/// A layer's data at every output position: inputs `[n, L, d_in']` (bias column included) and
/// output gradients `[n, L, d_out]` scaled by n (so that they are dl_i/dy_i).
pub struct PositionRows<B: Backend> {
    /// Layer inputs per sample and position, with a trailing 1 when the layer has a bias.
    pub a: Tensor<B, 3>,
    /// Per-sample output gradients per position.
    pub g: Tensor<B, 3>,
}

/// Unfolds and scales a capture into per-position rows.
pub fn position_rows<B: Backend>(capture: &LayerCapture<B>) -> PositionRows<B> {
    let [n, _, _] = capture.output_grad.dims();
    let scale = n as f64;
    let (a, g) = match (&capture.input, &capture.geometry) {
        (CapturedInput::Linear(x), LayerGeometry::Linear { .. }) => {
            (x.clone(), capture.output_grad.clone() * scale)
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
            let [top, bottom, left, right] = *padding;
            let x = if top + bottom + left + right > 0 {
                x.clone()
                    .pad([(top, bottom), (left, right)], PadMode::Constant(0.0))
            } else {
                x.clone()
            };
            let patches = unfold4d(x, *kernel, UnfoldOptions::new(*stride, [0, 0], *dilation));
            // [n, C k k, L] -> [n, L, C k k];  [n, d_out, L] -> [n, L, d_out]
            (
                patches.swap_dims(1, 2),
                capture.output_grad.clone().swap_dims(1, 2) * scale,
            )
        }
        _ => unreachable!("capture input kind always matches its geometry"),
    };
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
/// Linear layers (one position) and `SpatialMean` convolutions give Kronecker rows; `Exact`
/// convolutions give the materialised per-sample gradients.
pub fn per_sample_rows<B: Backend>(capture: &LayerCapture<B>, mode: ConvMode) -> PerSampleRows<B> {
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

/// K-FAC factors of one batch: `A = (1/(nL)) sum a a^T` and `G = (1/n) sum g g^T`.
///
/// For convolutions the expectation over positions follows KFC: A averages over samples and
/// positions, G sums over positions and averages over samples, so that `A kron G` approximates
/// the per-sample Fisher `E_i[vec(J_i) vec(J_i)^T]`. With one position and one sample they are
/// exactly `a a^T` and `g g^T`.
pub fn kfac_factors<B: Backend>(capture: &LayerCapture<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let PositionRows { a, g } = position_rows(capture);
    let [n, positions, d_in] = a.dims();
    let d_out = g.dims()[2];
    let a = a.reshape([n * positions, d_in]);
    let g = g.reshape([n * positions, d_out]);
    let a_factor = a.clone().transpose().matmul(a) / (n * positions) as f64;
    let g_factor = g.clone().transpose().matmul(g) / n as f64;
    (a_factor, g_factor)
}
