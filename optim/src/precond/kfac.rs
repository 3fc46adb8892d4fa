//! K-FAC: Kronecker-factored curvature with running-average factors, inverted by one of two
//! methods (KAISA's):
//!
//! - [`KfacMethod::Eigen`]: `A = Q_A diag(d_A) Q_A^T`, `G = Q_G diag(d_G) Q_G^T` and
//!   `v = Q_G [ (Q_G^T ghat Q_A) / (d_G d_A^T + lambda) ] Q_A^T`, the exact inverse of the damped
//!   Kronecker product. The decompositions run in f32 (as KAISA's, 2-3x faster than f64), which
//!   costs less than 1e-4 in the direction, even on factors with condition numbers of 1e8, as
//!   long as lambda is at least 1e-4 of the largest eigenvalue product; below that they are
//!   redone in f64. Eigenvalues are clamped at zero against round-off.
//! - [`KfacMethod::Inverse`]: Cholesky inverses of the damped factors,
//!   `v = (G + sqrt(lambda) I)^-1 ghat (A + sqrt(lambda) I)^-1`: the inverse of
//!   `(G + sqrt(lambda) I) kron (A + sqrt(lambda) I) = G kron A + sqrt(lambda) (G kron I + I kron
//!   A) + lambda I`, which keeps lambda's `lambda I` term of the eigen method (KAISA damps each
//!   factor by lambda itself). Much cheaper to compute than eigendecompositions; the damping is
//!   fixed at inversion time.
//!
//! Factors follow `factors::kfac_factors` (KFC convention for convolutions).

use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::CurvatureError;
use crate::linalg;

/// The smallest damping, relative to the largest eigenvalue product `d_A d_G`, for which the
/// f32 eigendecompositions are used: the direction's error in f32 grows as `eps |F| / lambda`
/// (1e-5 relative at 1e-4, measured in the tests), so below it they are redone in f64.
pub const F32_EIGEN_MIN_DAMPING: f64 = 1e-4;

/// How K-FAC inverts its factors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum KfacMethod {
    /// Eigendecompositions of both factors (exact damped Kronecker inverse).
    #[default]
    Eigen,
    /// Cholesky inverses of the factors damped by sqrt(lambda) each.
    Inverse,
}

/// Running factors and their eigendecompositions (or inverses) for one layer.
#[derive(Clone, Debug)]
pub struct KfacState<B: Backend> {
    /// Running average of a a^T, `[d_in', d_in']`.
    pub a_factor: Tensor<B, 2>,
    /// Running average of g g^T, `[d_out, d_out]`.
    pub g_factor: Tensor<B, 2>,
    /// Eigendecomposition of A: (eigenvectors, eigenvalues as a `[1, d_in']` row).
    pub a_eigen: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
    /// Eigendecomposition of G: (eigenvectors, eigenvalues as a `[d_out, 1]` column).
    pub g_eigen: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
    /// Inverse method: `(A + sqrt(lambda) I)^-1`, `(G + sqrt(lambda) I)^-1` and the lambda used.
    pub inverses: Option<(Tensor<B, 2>, Tensor<B, 2>, f64)>,
}

impl<B: Backend> KfacState<B> {
    /// A state holding the first factors of a layer.
    pub fn new(a_factor: Tensor<B, 2>, g_factor: Tensor<B, 2>) -> Self {
        Self {
            a_factor,
            g_factor,
            a_eigen: None,
            g_eigen: None,
            inverses: None,
        }
    }

    /// Folds new batch factors into the running averages: `F <- decay F + (1 - decay) F_new`.
    ///
    /// Decided on the device, without a host read: a new factor holding NaN or Inf is ignored
    /// (the running average is kept), and a running average that is not finite is replaced by
    /// the new factor.
    pub fn update_factors(&mut self, a_new: Tensor<B, 2>, g_new: Tensor<B, 2>, decay: f64) {
        self.a_factor = running_average(self.a_factor.clone(), a_new, decay);
        self.g_factor = running_average(self.g_factor.clone(), g_new, decay);
    }

    /// Whether an eigendecomposition or inverse is available.
    pub fn has_eigen(&self) -> bool {
        (self.a_eigen.is_some() && self.g_eigen.is_some()) || self.inverses.is_some()
    }

    /// The decompositions as one host buffer (to broadcast): `[Q_A, d_A, Q_G, d_G]` (eigen) or
    /// `[A^-1, G^-1]` (inverse).
    pub fn eigen_to_host(&self) -> Vec<f32> {
        let tensors: Vec<&Tensor<B, 2>> = match (&self.a_eigen, &self.g_eigen, &self.inverses) {
            (_, _, Some((a, g, _))) => vec![a, g],
            (Some((qa, da)), Some((qg, dg)), None) => vec![qa, da, qg, dg],
            _ => return Vec::new(),
        };
        tensors
            .into_iter()
            .flat_map(|t| crate::host::read_f32(t.clone()))
            .collect()
    }

    /// Sets the eigendecompositions from a buffer written by [`KfacState::eigen_to_host`].
    pub fn eigen_from_host(&mut self, buf: &[f32], da: usize, dg: usize) {
        self.decompositions_from_host(KfacMethod::Eigen, buf, da, dg, 0.0)
    }

    /// [`KfacState::eigen_from_host`] for either method (`damping`: the lambda the inverse
    /// method was inverted with).
    pub fn decompositions_from_host(
        &mut self,
        method: KfacMethod,
        buf: &[f32],
        da: usize,
        dg: usize,
        damping: f64,
    ) {
        let device = self.a_factor.device();
        let t = |v: &[f32], shape: [usize; 2]| {
            crate::host::upload_floats::<B, 2>(v.to_vec(), shape, &device)
        };
        match method {
            KfacMethod::Eigen => {
                let (qa, rest) = buf.split_at(da * da);
                let (ea, rest) = rest.split_at(da);
                let (qg, eg) = rest.split_at(dg * dg);
                self.a_eigen = Some((t(qa, [da, da]), t(ea, [1, da])));
                self.g_eigen = Some((t(qg, [dg, dg]), t(eg, [dg, 1])));
                self.inverses = None;
            }
            KfacMethod::Inverse => {
                let (a, g) = buf.split_at(da * da);
                self.inverses = Some((t(a, [da, da]), t(g, [dg, dg]), damping));
                self.a_eigen = None;
                self.g_eigen = None;
            }
        }
    }

    /// Length of [`KfacState::eigen_to_host`]'s buffer for factors of `da` and `dg`.
    pub fn host_len(method: KfacMethod, da: usize, dg: usize) -> usize {
        match method {
            KfacMethod::Eigen => da * da + da + dg * dg + dg,
            KfacMethod::Inverse => da * da + dg * dg,
        }
    }

    /// Recomputes both eigendecompositions on the host for use with damping `damping` (see
    /// [`KfacState::invert`]).
    pub fn update_inverses(&mut self, damping: f64) -> Result<(), CurvatureError> {
        self.invert(KfacMethod::Eigen, damping)
    }

    /// Recomputes the decompositions of `method` on the host for damping `damping` (the inverse
    /// method bakes it in; the eigen method works in f32 unless `damping` is below
    /// [`F32_EIGEN_MIN_DAMPING`] times the largest `d_A d_G`, where it redoes the decompositions
    /// in f64). On an error the previous decompositions are kept.
    pub fn invert(&mut self, method: KfacMethod, damping: f64) -> Result<(), CurvatureError> {
        let device = self.a_factor.device();
        match method {
            KfacMethod::Eigen => {
                let (d_a, q_a) = linalg::symmetric_eigen_f32(
                    linalg::to_host_f32(self.a_factor.clone()).as_ref(),
                )?;
                let (d_g, q_g) = linalg::symmetric_eigen_f32(
                    linalg::to_host_f32(self.g_factor.clone()).as_ref(),
                )?;
                let top = |d: &[f64]| d.iter().cloned().fold(0.0, f64::max);
                let clamp = |d: Vec<f64>| d.into_iter().map(|x| x.max(0.0)).collect::<Vec<_>>();
                let ((d_a, q_a), (d_g, q_g)) = if damping
                    >= F32_EIGEN_MIN_DAMPING * top(&d_a) * top(&d_g)
                {
                    let up = |q: &faer::Mat<f32>| linalg::to_device_f32::<B>(q.as_ref(), &device);
                    ((clamp(d_a), up(&q_a)), (clamp(d_g), up(&q_g)))
                } else {
                    let exact = |t: Tensor<B, 2>| -> Result<_, CurvatureError> {
                        let (d, q) = linalg::symmetric_eigen(linalg::to_host(t).as_ref())?;
                        Ok((clamp(d), linalg::to_device::<B>(q.as_ref(), &device)))
                    };
                    (exact(self.a_factor.clone())?, exact(self.g_factor.clone())?)
                };
                let (na, ng) = (d_a.len(), d_g.len());
                self.a_eigen = Some((
                    q_a,
                    linalg::vec_to_device::<B>(&d_a, &device).reshape([1, na]),
                ));
                self.g_eigen = Some((
                    q_g,
                    linalg::vec_to_device::<B>(&d_g, &device).reshape([ng, 1]),
                ));
                self.inverses = None;
            }
            KfacMethod::Inverse => {
                let shift = damping.sqrt();
                let a_inv = damped_inverse(self.a_factor.clone(), shift, &device)?;
                let g_inv = damped_inverse(self.g_factor.clone(), shift, &device)?;
                self.inverses = Some((a_inv, g_inv, damping));
                self.a_eigen = None;
                self.g_eigen = None;
            }
        }
        Ok(())
    }

    /// The preconditioned direction for a gradient `[d_out, d_in']`; the damped identity
    /// `grad / damping` before the first successful decomposition. (The inverse method uses the
    /// damping it was inverted with.)
    pub fn apply(&self, grad: Tensor<B, 2>, damping: f64) -> Tensor<B, 2> {
        if let Some((a_inv, g_inv, _)) = &self.inverses {
            return g_inv.clone().matmul(grad).matmul(a_inv.clone());
        }
        let (Some((q_a, d_a)), Some((q_g, d_g))) = (&self.a_eigen, &self.g_eigen) else {
            return grad / damping;
        };
        let rotated = q_g.clone().transpose().matmul(grad).matmul(q_a.clone());
        let scaled = rotated / (d_g.clone().matmul(d_a.clone()) + damping);
        q_g.clone().matmul(scaled).matmul(q_a.clone().transpose())
    }
}

/// `(factor + shift I)^-1` by Cholesky, in f32 (as KAISA's) when the shift is at least
/// [`F32_EIGEN_MIN_DAMPING`] of the factor's largest diagonal entry (an upper bound on the
/// condition number of `1 / F32_EIGEN_MIN_DAMPING`), in f64 otherwise.
fn damped_inverse<B: Backend>(
    factor: Tensor<B, 2>,
    shift: f64,
    device: &B::Device,
) -> Result<Tensor<B, 2>, CurvatureError> {
    let mut m = linalg::to_host_f32(factor);
    let n = m.nrows();
    let top = (0..n).map(|i| f64::from(m[(i, i)])).fold(0.0, f64::max);
    if shift >= F32_EIGEN_MIN_DAMPING * top.max(f64::MIN_POSITIVE) {
        for i in 0..n {
            m[(i, i)] += shift as f32;
        }
        let inverse = linalg::spd_inverse_f32(m.as_ref())?;
        Ok(linalg::to_device_f32(inverse.as_ref(), device))
    } else {
        let mut m = faer::Mat::<f64>::from_fn(n, n, |i, j| f64::from(m[(i, j)]));
        for i in 0..n {
            m[(i, i)] += shift;
        }
        let inverse = linalg::spd_inverse(m.as_ref())?;
        Ok(linalg::to_device(inverse.as_ref(), device))
    }
}

/// `decay old + (1 - decay) new`, keeping `old` where `new` is not finite and taking `new` where
/// `old` is not (decided on the device).
fn running_average<B: Backend>(old: Tensor<B, 2>, new: Tensor<B, 2>, decay: f64) -> Tensor<B, 2> {
    let dims = old.dims();
    let flag = |t: &Tensor<B, 2>| {
        (t.clone() * 0.0)
            .sum()
            .is_finite()
            .reshape([1, 1])
            .expand(dims)
    };
    let (old_ok, new_ok) = (flag(&old), flag(&new));
    let blended = old.clone() * decay + new.clone() * (1.0 - decay);
    let fresh = old.clone().mask_where(new_ok.clone(), new);
    fresh.mask_where(old_ok.bool_and(new_ok), blended)
}
