//! The state every Woodbury-type method (SNGD, KIS, KID) refreshes and then reuses:
//! v = (1/lambda) [ ghat - J_S^T M J_S ghat ].

use burn::tensor::{backend::Backend, Tensor};

use crate::rows::PerSampleRows;

/// How the kept rows J_S make the Fisher that the preconditioner inverts: `F = J_S^T W J_S`.
#[derive(Clone, Debug)]
pub enum FisherWeights<B: Backend> {
    /// `W = I / count`: the mean over `count` samples (SNGD: n; KIS: r, as the paper's n := r).
    Mean(usize),
    /// `W = lambda S_mat` (KID: the r skeleton rows stand in for all n, through the
    /// interpolation matrix P; `S_mat = P (E + n lambda I)^-1 P^T`).
    Matrix(Tensor<B, 2>),
}

/// Kept rows J_S of one layer and the r x r matrix M that applies its damped inverse Fisher.
#[derive(Clone, Debug)]
pub struct LowRankState<B: Backend> {
    /// Kept per-sample rows (all n for SNGD, r for KIS and KID); `None` when r = 0.
    pub rows: Option<PerSampleRows<B>>,
    /// The r x r middle matrix M (device).
    pub m: Option<Tensor<B, 2>>,
    /// Damping lambda the state was built with.
    pub damping: f64,
    /// The Fisher the state inverts, for the quadratic model of adaptive damping.
    pub fisher: FisherWeights<B>,
}

impl<B: Backend> LowRankState<B> {
    /// A state that only divides by lambda (no kept rows: zero curvature).
    pub fn identity(damping: f64) -> Self {
        Self {
            rows: None,
            m: None,
            damping,
            fisher: FisherWeights::Mean(1),
        }
    }

    /// Number of kept rows r.
    pub fn rank(&self) -> usize {
        self.rows.as_ref().map_or(0, PerSampleRows::len)
    }

    /// The preconditioned direction for a gradient `[d_out, d_in']`.
    pub fn apply(&self, grad: Tensor<B, 2>) -> Tensor<B, 2> {
        let correction = match (&self.rows, &self.m) {
            (Some(rows), Some(m)) => {
                let u = m.clone().matmul(rows.apply(grad.clone()));
                Some(rows.apply_transpose(u))
            }
            _ => None,
        };
        match correction {
            Some(c) => (grad - c) / self.damping,
            None => grad / self.damping,
        }
    }

    /// `delta^T F delta` (`[1]`) for a step `delta` `[d_out, d_in']`, with the Fisher this state
    /// inverts (damping excluded): zero without kept rows.
    pub fn quadratic(&self, delta: Tensor<B, 2>) -> Tensor<B, 1> {
        let Some(rows) = &self.rows else {
            return Tensor::zeros([1], &delta.device());
        };
        let u = rows.apply(delta); // [r, 1]
        match &self.fisher {
            FisherWeights::Mean(count) => u.powi_scalar(2).sum() / (*count).max(1) as f64,
            FisherWeights::Matrix(w) => {
                (u.clone().transpose().matmul(w.clone().matmul(u))).reshape([1])
            }
        }
    }
}
