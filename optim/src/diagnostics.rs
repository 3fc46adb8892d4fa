//! The HyLo paper's analyses as library functions: kernel rank, gradient norm, and the error of the
//! KID and KIS directions against SNGD.

use burn::tensor::{backend::Backend, Tensor};

use crate::error::CurvatureError;
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

#[cfg(test)]
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
}
