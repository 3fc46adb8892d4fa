//! The HyLo paper's analyses as library functions: kernel rank, gradient norm, the error of the
//! KID and KIS directions against SNGD, and how a convolution's compressed per-sample rows
//! compare with its exact per-sample gradients.

use burn::tensor::{backend::Backend, Tensor};

use crate::capture::LayerCapture;
use crate::error::CurvatureError;
use crate::factors::{per_sample_rows, ConvMode};
use crate::linalg;
use crate::precond::{kid, kis, sngd};
use crate::rows::PerSampleRows;

/// Number of singular values of the kernel K = J J^T that hold `mass` (e.g. 0.9) of their sum.
pub fn kernel_rank<B: Backend>(
    rows: &PerSampleRows<B>,
    mass: f64,
) -> Result<usize, CurvatureError> {
    let values = linalg::singular_values(linalg::to_host(rows.kernel()).as_ref())?;
    let total: f64 = values.iter().sum();
    if total <= 0.0 {
        return Ok(0);
    }
    let mut acc = 0.0;
    for (k, v) in values.iter().enumerate() {
        acc += v;
        if acc >= mass * total {
            return Ok(k + 1);
        }
    }
    Ok(values.len())
}

/// Frobenius norm of a layer gradient.
pub fn gradient_norm<B: Backend>(grad: &Tensor<B, 2>) -> f64 {
    crate::host::read_scalar(grad.clone().powi_scalar(2).sum()).sqrt()
}

/// Relative errors ||v - v_SNGD|| / ||v_SNGD|| of KID and KIS at compression `rho`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradientError {
    /// KID's relative error.
    pub kid: f64,
    /// KIS's relative error.
    pub kis: f64,
}

/// Gradient error of KID and KIS against SNGD for one layer's rows and gradient.
pub fn gradient_error<B: Backend>(
    rows: &PerSampleRows<B>,
    grad: &Tensor<B, 2>,
    damping: f64,
    rho: f64,
    seed: u64,
) -> Result<GradientError, CurvatureError> {
    let exact = sngd::refresh(rows.clone(), damping)?.apply(grad.clone());
    let norm = gradient_norm(&exact).max(f64::MIN_POSITIVE);
    let r = kis::kept_rows(rho, rows.len());
    let kid_v = kid::refresh(rows.clone(), damping, r)?.apply(grad.clone());
    let kis_v = kis::refresh(rows.clone(), damping, rho, seed)?.apply(grad.clone());
    Ok(GradientError {
        kid: gradient_norm(&(kid_v - exact.clone())) / norm,
        kis: gradient_norm(&(kis_v - exact)) / norm,
    })
}

/// The modes compared by [`row_scale`], in the order of its arrays.
pub const ROW_MODES: [ConvMode; 3] = [
    ConvMode::SpatialMean,
    ConvMode::GradientScale,
    ConvMode::Exact,
];

/// One layer's per-sample rows in each [`ConvMode`] against the exact per-sample gradients.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RowScale {
    /// Output positions L (1 for a linear layer).
    pub positions: usize,
    /// Largest eigenvalue of the Fisher `F = J^T J / n` the rows make (that of the kernel
    /// `K / n`), per mode of [`ROW_MODES`]: what the damping is added to.
    pub top_eigenvalue: [f64; 3],
    /// Mean over the samples of `|J_i| / |J_i exact|`, per mode.
    pub norm_ratio: [f64; 3],
    /// Mean over the samples of the cosine between `J_i` and `J_i exact` (the same for every
    /// mode but `Exact`'s, which is 1: the modes only scale the same rows).
    pub cosine: f64,
}

/// Compares a layer's per-sample rows in every [`ConvMode`] with its exact per-sample gradients
/// (which it materialises: `n x d_out d_in'` values).
pub fn row_scale<B: Backend>(capture: &LayerCapture<B>) -> Result<RowScale, CurvatureError> {
    let n = capture.output_grad.dims()[0];
    let positions = match &capture.geometry {
        crate::capture::LayerGeometry::Conv2d { .. } => capture.output_grad.dims()[2],
        crate::capture::LayerGeometry::Linear { .. } => capture.output_grad.dims()[1],
    };
    let jacobians = ROW_MODES.map(|mode| per_sample_rows(capture, mode).jacobian());
    let exact = jacobians[2].clone();
    let exact_norms = exact.clone().powi_scalar(2).sum_dim(1).sqrt();
    let mut top_eigenvalue = [0.0; 3];
    let mut norm_ratio = [0.0; 3];
    let mut cosine = 0.0;
    for (k, j) in jacobians.into_iter().enumerate() {
        let kernel = linalg::to_host(j.clone().matmul(j.clone().transpose()));
        top_eigenvalue[k] = linalg::singular_values(kernel.as_ref())?
            .first()
            .copied()
            .unwrap_or(0.0)
            / n as f64;
        let norms = j.clone().powi_scalar(2).sum_dim(1).sqrt();
        let ratios = crate::host::read_f64(norms.clone() / exact_norms.clone());
        norm_ratio[k] = ratios.iter().sum::<f64>() / n as f64;
        if k == 0 {
            let dots = (j * exact.clone()).sum_dim(1);
            let cos = crate::host::read_f64(dots / (norms * exact_norms.clone()));
            cosine = cos.iter().sum::<f64>() / n as f64;
        }
    }
    Ok(RowScale {
        positions,
        top_eigenvalue,
        norm_ratio,
        cosine,
    })
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tests upload freely.
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    fn rank_two_rows() -> PerSampleRows<Flex> {
        let dev = Default::default();
        let base_a = Tensor::<Flex, 2>::random([2, 5], Distribution::Normal(0.0, 1.0), &dev);
        let base_g = Tensor::<Flex, 2>::random([2, 3], Distribution::Normal(0.0, 1.0), &dev);
        let idx = Tensor::from_data(TensorData::new(vec![0i64, 1, 0, 1, 0, 1, 0, 1], [8]), &dev);
        PerSampleRows::Kronecker {
            a: base_a.select(0, idx.clone()),
            g: base_g.select(0, idx),
        }
    }

    #[test]
    fn rank_of_a_rank_two_kernel() {
        let rows = rank_two_rows();
        assert!(kernel_rank(&rows, 0.9).unwrap() <= 2);
        assert_eq!(kernel_rank(&rows, 1.0 - 1e-9).unwrap(), 2);
        let zero = PerSampleRows::<Flex>::Kronecker {
            a: Tensor::zeros([4, 3], &Default::default()),
            g: Tensor::zeros([4, 2], &Default::default()),
        };
        assert_eq!(kernel_rank(&zero, 0.9).unwrap(), 0);
    }

    #[test]
    fn errors_vanish_in_the_exact_limits() {
        let rows = rank_two_rows();
        let grad =
            Tensor::<Flex, 2>::random([3, 5], Distribution::Normal(0.0, 1.0), &Default::default());
        // rho = 1: KIS keeps every row and KID is full rank.
        let e = gradient_error(&rows, &grad, 0.1, 1.0, 0).unwrap();
        assert!(e.kid < 1e-4 && e.kis < 1e-4, "{e:?}");
        // rank-2 kernel, r = ceil(0.25 * 8) = 2: KID stays exact, KIS does not have to.
        let e = gradient_error(&rows, &grad, 0.1, 0.25, 0).unwrap();
        assert!(e.kid < 1e-3, "{e:?}");
        assert!(e.kis.is_finite());
        let hand = Tensor::<Flex, 2>::from_floats([[3.0, 0.0], [0.0, -4.0]], &Default::default());
        assert_eq!(gradient_norm(&hand), 5.0);
    }

    #[test]
    fn row_scale_of_a_convolution_with_constant_input_and_gradient() {
        use crate::capture::{CapturedInput, LayerGeometry};
        use burn::module::ParamId;
        // Input and output gradient constant over the L = 4 x 4 positions (no padding): the
        // gradient-scale rows are the exact per-sample gradients, the paper's are 1/L of them,
        // and the curvature 1/L^2.
        let dev = Default::default();
        let normal = Distribution::Normal(0.0, 1.0);
        let (n, c, d_out) = (5, 2, 3);
        let capture = LayerCapture::<Flex> {
            weight_id: ParamId::new(),
            bias_id: None,
            geometry: LayerGeometry::Conv2d {
                channels_in: c,
                channels_out: d_out,
                kernel: [3, 3],
                stride: [1, 1],
                dilation: [1, 1],
                padding: [0, 0, 0, 0],
                bias: false,
            },
            input: CapturedInput::Conv(
                Tensor::<Flex, 4>::random([n, c, 1, 1], normal, &dev).expand([n, c, 6, 6]),
            ),
            output_grad: Tensor::<Flex, 3>::random([n, d_out, 1], normal, &dev)
                .expand([n, d_out, 16]),
        };
        let s = row_scale(&capture).unwrap();
        assert_eq!(s.positions, 16);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b.abs();
        assert!(close(s.norm_ratio[0], 1.0 / 16.0), "{s:?}");
        assert!(
            close(s.norm_ratio[1], 1.0) && close(s.norm_ratio[2], 1.0),
            "{s:?}"
        );
        assert!(close(s.cosine, 1.0), "{s:?}");
        assert!(
            close(s.top_eigenvalue[0] * 256.0, s.top_eigenvalue[2]),
            "{s:?}"
        );
        assert!(close(s.top_eigenvalue[1], s.top_eigenvalue[2]), "{s:?}");
    }
}
