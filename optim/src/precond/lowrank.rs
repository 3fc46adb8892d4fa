//! The state every Woodbury-type method (SNGD, KIS, KID) refreshes and then reuses:
//! v = (1/lambda) [ ghat - J_S^T M J_S ghat ].

use burn::tensor::{backend::Backend, Tensor};

use crate::rows::PerSampleRows;

/// Kept rows J_S of one layer and the r x r matrix M that applies its damped inverse Fisher.
#[derive(Clone, Debug)]
pub struct LowRankState<B: Backend> {
    /// Kept per-sample rows (all n for SNGD, r for KIS and KID); `None` when r = 0.
    pub rows: Option<PerSampleRows<B>>,
    /// The r x r middle matrix M (device).
    pub m: Option<Tensor<B, 2>>,
    /// Damping lambda the state was built with.
    pub damping: f64,
}

impl<B: Backend> LowRankState<B> {
    /// A state that only divides by lambda (no kept rows: zero curvature).
    pub fn identity(damping: f64) -> Self {
        Self {
            rows: None,
            m: None,
            damping,
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
}
