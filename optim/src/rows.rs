//! Per-sample gradients of one layer, in the two forms the low-rank methods use.
//!
//! Everything here stays on the device; only the n x n kernel goes to the host.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

/// The per-sample gradients J_i (d_out x d_in') of n samples of one layer.
#[derive(Clone, Debug)]
pub enum PerSampleRows<B: Backend> {
    /// J_i = g_i a_i^T: rows a `[n, d_in']` and g `[n, d_out]`.
    Kronecker {
        /// Layer inputs (bias column included).
        a: Tensor<B, 2>,
        /// Per-sample output gradients.
        g: Tensor<B, 2>,
    },
    /// J_i materialised: `[n, d_out * d_in']`, row-major in (out, in).
    Dense {
        /// Per-sample gradients, one per row.
        j: Tensor<B, 2>,
        /// Rows of each J_i.
        d_out: usize,
    },
}

impl<B: Backend> PerSampleRows<B> {
    /// Number of samples n.
    pub fn len(&self) -> usize {
        match self {
            Self::Kronecker { a, .. } => a.dims()[0],
            Self::Dense { j, .. } => j.dims()[0],
        }
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device the rows live on.
    pub fn device(&self) -> B::Device {
        match self {
            Self::Kronecker { a, .. } => a.device(),
            Self::Dense { j, .. } => j.device(),
        }
    }

    /// Shape `[d_out, d_in']` of one per-sample gradient.
    pub fn grad_shape(&self) -> [usize; 2] {
        match self {
            Self::Kronecker { a, g } => [g.dims()[1], a.dims()[1]],
            Self::Dense { j, d_out } => [*d_out, j.dims()[1] / d_out],
        }
    }

    /// The kernel K = J J^T (n x n): `(A A^T) o (G G^T)` for Kronecker rows.
    pub fn kernel(&self) -> Tensor<B, 2> {
        match self {
            Self::Kronecker { a, g } => {
                a.clone().matmul(a.clone().transpose()) * g.clone().matmul(g.clone().transpose())
            }
            Self::Dense { j, .. } => j.clone().matmul(j.clone().transpose()),
        }
    }

    /// The diagonal of the kernel, |J_i|^2 (= |a_i|^2 |g_i|^2), without forming the kernel.
    pub fn squared_norms(&self) -> Tensor<B, 1> {
        match self {
            Self::Kronecker { a, g } => {
                let n = a.dims()[0];
                (a.clone().powi_scalar(2).sum_dim(1) * g.clone().powi_scalar(2).sum_dim(1))
                    .reshape([n])
            }
            Self::Dense { j, .. } => {
                let n = j.dims()[0];
                j.clone().powi_scalar(2).sum_dim(1).reshape([n])
            }
        }
    }

    /// J v for a gradient-shaped v `[d_out, d_in']`: the n inner products <J_i, v>, as `[n, 1]`.
    pub fn apply(&self, v: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Self::Kronecker { a, g } => g.clone().matmul(v).mul(a.clone()).sum_dim(1),
            Self::Dense { j, .. } => {
                let len = v.dims()[0] * v.dims()[1];
                j.clone().matmul(v.reshape([len, 1]))
            }
        }
    }

    /// J^T u for u `[n, 1]`: sum_i u_i J_i, shaped `[d_out, d_in']`.
    pub fn apply_transpose(&self, u: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            Self::Kronecker { a, g } => g.clone().mul(u).transpose().matmul(a.clone()),
            Self::Dense { j, .. } => {
                let shape = self.grad_shape();
                u.transpose().matmul(j.clone()).reshape(shape)
            }
        }
    }

    /// The rows at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Self {
        let device = self.device();
        let idx: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        let idx: Tensor<B, 1, Int> = crate::host::upload(
            TensorData::new(idx, [indices.len()]).convert::<B::IntElem>(),
            &device,
        );
        match self {
            Self::Kronecker { a, g } => Self::Kronecker {
                a: a.clone().select(0, idx.clone()),
                g: g.clone().select(0, idx),
            },
            Self::Dense { j, d_out } => Self::Dense {
                j: j.clone().select(0, idx),
                d_out: *d_out,
            },
        }
    }

    /// The Jacobian J `[n, d_out * d_in']` (row-major vec of each J_i); for tests and diagnostics.
    pub fn jacobian(&self) -> Tensor<B, 2> {
        match self {
            Self::Kronecker { a, g } => {
                let [n, d_in] = a.dims();
                let d_out = g.dims()[1];
                let outer = g
                    .clone()
                    .reshape([n, d_out, 1])
                    .matmul(a.clone().reshape([n, 1, d_in]));
                outer.reshape([n, d_out * d_in])
            }
            Self::Dense { j, .. } => j.clone(),
        }
    }
}
