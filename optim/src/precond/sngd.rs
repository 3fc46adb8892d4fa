//! SNGD: the exact damped natural gradient through Sherman-Morrison-Woodbury.
//!
//! v = (1/lambda) [ghat - J^T (K + n lambda I)^-1 J ghat], K = J J^T (n x n). The n x n system
//! is factorised by Cholesky on the host. Because the same state is applied to a new gradient on
//! every step until the next refresh, M = (K + n lambda I)^-1 is formed once from the Cholesky
//! factor and kept on the device, so no later step needs a host round trip.

use burn::tensor::backend::Backend;
use faer::Mat;

use super::lowrank::{FisherWeights, LowRankState};
use crate::error::CurvatureError;
use crate::linalg;
use crate::rows::PerSampleRows;

/// Builds the SNGD state of one layer from its per-sample rows.
pub fn refresh<B: Backend>(
    rows: PerSampleRows<B>,
    damping: f64,
) -> Result<LowRankState<B>, CurvatureError> {
    let n = rows.len();
    refresh_normalised(rows, damping, n)
}

/// The SNGD formula on `rows` with the sample count `n` of `(K + n lambda I)^-1` given
/// explicitly (KIS uses n := r even when fewer than r rows had weight).
pub fn refresh_normalised<B: Backend>(
    rows: PerSampleRows<B>,
    damping: f64,
    n: usize,
) -> Result<LowRankState<B>, CurvatureError> {
    if rows.is_empty() {
        return Ok(LowRankState::identity(damping));
    }
    let kernel = linalg::to_host(rows.kernel());
    let m = damped_kernel_inverse(kernel, n as f64 * damping)?;
    let device = rows.device();
    Ok(LowRankState {
        m: Some(linalg::to_device(m.as_ref(), &device)),
        rows: Some(rows),
        damping,
        fisher: FisherWeights::Mean(n),
    })
}

/// (K + shift I)^-1 by Cholesky.
pub(crate) fn damped_kernel_inverse(
    mut kernel: Mat<f64>,
    shift: f64,
) -> Result<Mat<f64>, CurvatureError> {
    if !linalg::all_finite(kernel.as_ref()) {
        return Err(CurvatureError::NonFinite { what: "kernel K" });
    }
    for i in 0..kernel.nrows() {
        kernel[(i, i)] += shift;
    }
    linalg::spd_inverse(kernel.as_ref())
}
