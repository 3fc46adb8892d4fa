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
    pub fn update_factors(&mut self, a_new: Tensor<B, 2>, g_new: Tensor<B, 2>, decay: f64) {
        self.a_factor = self.a_factor.clone() * decay + a_new * (1.0 - decay);
        self.g_factor = self.g_factor.clone() * decay + g_new * (1.0 - decay);
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

    /// The preconditioned direction for a gradient `[d_out, d_in']`; `None` before the first
    /// eigendecomposition.
    pub fn apply(&self, grad: Tensor<B, 2>, damping: f64) -> Option<Tensor<B, 2>> {
        let (q_a, d_a) = self.a_eigen.as_ref()?;
        let (q_g, d_g) = self.g_eigen.as_ref()?;
        let rotated = q_g.clone().transpose().matmul(grad).matmul(q_a.clone());
        let scaled = rotated / (d_g.clone().matmul(d_a.clone()) + damping);
        Some(q_g.clone().matmul(scaled).matmul(q_a.clone().transpose()))
    }
}
