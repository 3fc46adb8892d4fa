//! K-FAC: Kronecker-factored curvature with running-average factors and eigen-decomposed inverses.
//!
//! v = Q_G [ (Q_G^T ghat Q_A) / (d_G d_A^T + lambda) ] Q_A^T. Factors follow `factors::kfac_factors`
//! (KFC convention for convolutions); eigenvalues are clamped at zero against round-off.

use burn::tensor::{backend::Backend, Tensor};

use crate::error::CurvatureError;
use crate::linalg;

/// Running factors and their eigendecompositions for one layer.
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
}

impl<B: Backend> KfacState<B> {
    /// A state holding the first factors of a layer.
    pub fn new(a_factor: Tensor<B, 2>, g_factor: Tensor<B, 2>) -> Self {
        Self {
            a_factor,
            g_factor,
            a_eigen: None,
            g_eigen: None,
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

    /// Whether an eigendecomposition is available.
    pub fn has_eigen(&self) -> bool {
        self.a_eigen.is_some() && self.g_eigen.is_some()
    }

    /// The eigendecompositions as one host buffer `[Q_A, d_A, Q_G, d_G]` (to broadcast).
    pub fn eigen_to_host(&self) -> Vec<f32> {
        let (Some((qa, da)), Some((qg, dg))) = (&self.a_eigen, &self.g_eigen) else {
            return Vec::new();
        };
        [qa, da, qg, dg]
            .into_iter()
            .flat_map(|t| crate::host::read_f32(t.clone()))
            .collect()
    }

    /// Sets the eigendecompositions from a buffer written by [`KfacState::eigen_to_host`].
    pub fn eigen_from_host(&mut self, buf: &[f32], da: usize, dg: usize) {
        let device = self.a_factor.device();
        let t = |v: &[f32], shape: [usize; 2]| {
            Tensor::<B, 2>::from_data(
                burn::tensor::TensorData::new(v.to_vec(), shape).convert::<B::FloatElem>(),
                &device,
            )
        };
        let (qa, rest) = buf.split_at(da * da);
        let (ea, rest) = rest.split_at(da);
        let (qg, eg) = rest.split_at(dg * dg);
        self.a_eigen = Some((t(qa, [da, da]), t(ea, [1, da])));
        self.g_eigen = Some((t(qg, [dg, dg]), t(eg, [dg, 1])));
    }

    /// Recomputes both eigendecompositions on the host.
    pub fn update_inverses(&mut self) -> Result<(), CurvatureError> {
        let device = self.a_factor.device();
        let (d_a, q_a) = linalg::symmetric_eigen(linalg::to_host(self.a_factor.clone()).as_ref())?;
        let (d_g, q_g) = linalg::symmetric_eigen(linalg::to_host(self.g_factor.clone()).as_ref())?;
        let clamp = |d: Vec<f64>| d.into_iter().map(|x| x.max(0.0)).collect::<Vec<_>>();
        let (d_a, d_g) = (clamp(d_a), clamp(d_g));
        let (na, ng) = (d_a.len(), d_g.len());
        self.a_eigen = Some((
            linalg::to_device(q_a.as_ref(), &device),
            linalg::vec_to_device::<B>(&d_a, &device).reshape([1, na]),
        ));
        self.g_eigen = Some((
            linalg::to_device(q_g.as_ref(), &device),
            linalg::vec_to_device::<B>(&d_g, &device).reshape([ng, 1]),
        ));
        Ok(())
    }

    /// The preconditioned direction for a gradient `[d_out, d_in']`; the damped identity
    /// `grad / damping` before the first successful eigendecomposition.
    pub fn apply(&self, grad: Tensor<B, 2>, damping: f64) -> Tensor<B, 2> {
        let (Some((q_a, d_a)), Some((q_g, d_g))) = (&self.a_eigen, &self.g_eigen) else {
            return grad / damping;
        };
        let rotated = q_g.clone().transpose().matmul(grad).matmul(q_a.clone());
        let scaled = rotated / (d_g.clone().matmul(d_a.clone()) + damping);
        q_g.clone().matmul(scaled).matmul(q_a.clone().transpose())
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
