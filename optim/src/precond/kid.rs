//! KID: Kronecker interpolative decomposition (HyLo), with a column-pivoted QR of the kernel.
//!
//! K[:, piv] = Q R; with the rows reordered by piv, K = K[:, :r] P + E, P = [I, R11^-1 R12].
//! S = P (E + n lambda I)^-1 P^T, M = (S^-1 + K_SS)^-1 = S - S K_SS (I + S K_SS)^-1 S, and the
//! update uses the skeleton rows piv[..r]. At r = n, or when K has rank <= r, this is SNGD.
//! When the kernel's numerical rank is below r, r is lowered to that rank (the dropped part of K
//! is below the rank tolerance), which keeps R11 invertible.

use burn::tensor::backend::Backend;
use faer::Mat;

use super::lowrank::{FisherWeights, LowRankState};
use super::sngd;
use crate::error::CurvatureError;
use crate::linalg;
use crate::rows::PerSampleRows;

/// Relative size of a QR diagonal entry below which the kernel is taken as rank deficient.
pub const RANK_TOLERANCE: f64 = 1e-7;

/// Builds the KID state of one layer keeping at most `rank` skeleton rows.
pub fn refresh<B: Backend>(
    rows: PerSampleRows<B>,
    damping: f64,
    rank: usize,
) -> Result<LowRankState<B>, CurvatureError> {
    let n = rows.len();
    if n == 0 {
        return Ok(LowRankState::identity(damping));
    }
    if rank >= n {
        return sngd::refresh(rows, damping);
    }
    let kernel = linalg::to_host(rows.kernel());
    if !linalg::all_finite(kernel.as_ref()) {
        return Err(CurvatureError::NonFinite { what: "kernel K" });
    }
    let Some(KidMiddle { skeleton, m, s }) = middle_matrix(&kernel, damping, rank)? else {
        return Ok(LowRankState::identity(damping));
    };
    let device = rows.device();
    Ok(LowRankState {
        m: Some(linalg::to_device(m.as_ref(), &device)),
        rows: Some(rows.select(&skeleton)),
        damping,
        fisher: FisherWeights::Matrix(linalg::to_device(
            Mat::from_fn(s.nrows(), s.ncols(), |i, j| s[(i, j)] * damping).as_ref(),
            &device,
        )),
    })
}

/// Skeleton row indices (in pivot order) and the r x r `S_mat`.
pub(crate) type Skeleton = (Vec<usize>, Mat<f64>);

/// KID's result on one kernel.
pub(crate) struct KidMiddle {
    /// Skeleton row indices, in the original order.
    pub skeleton: Vec<usize>,
    /// The r x r middle matrix M.
    pub m: Mat<f64>,
    /// `S_mat = P (E + n lambda I)^-1 P^T`: the preconditioner inverts `J_S^T (lambda S_mat)
    /// J_S + lambda I`.
    pub s: Mat<f64>,
}

/// Skeleton row indices, M and `S_mat` for a host kernel; `None` when the kernel is zero.
pub(crate) fn middle_matrix(
    kernel: &Mat<f64>,
    damping: f64,
    rank: usize,
) -> Result<Option<KidMiddle>, CurvatureError> {
    let n = kernel.nrows();
    let Some((skeleton, s)) = local_skeleton(kernel, n as f64 * damping, rank)? else {
        return Ok(None);
    };
    let r = skeleton.len();
    let k_ss = Mat::from_fn(r, r, |i, j| kernel[(skeleton[i], skeleton[j])]);
    let m = combine(&s, &k_ss)?;
    Ok(Some(KidMiddle { skeleton, m, s }))
}

/// Steps 1-3 of KID on one kernel: the skeleton rows (pivot order) and
/// `S_mat = P (E + shift I)^-1 P^T` (shift = n lambda, or N lambda for a worker's local kernel
/// in distributed KID); `None` when the kernel is zero.
pub(crate) fn local_skeleton(
    kernel: &Mat<f64>,
    shift: f64,
    rank: usize,
) -> Result<Option<Skeleton>, CurvatureError> {
    let n = kernel.nrows();
    let (_q, r_full, piv) = linalg::pivoted_qr(kernel.as_ref());
    let top = r_full[(0, 0)].abs();
    let numerical_rank = (0..n.min(rank))
        .take_while(|&k| top > 0.0 && r_full[(k, k)].abs() > RANK_TOLERANCE * top)
        .count();
    if numerical_rank == 0 {
        return Ok(None);
    }
    let r = numerical_rank;
    // Kernel with rows and columns in pivot order.
    let kp = Mat::from_fn(n, n, |i, j| kernel[(piv[i], piv[j])]);
    // P = [I_r, T], T = R11^-1 R12.
    let t = linalg::upper_triangular_solve(
        r_full.as_ref().submatrix(0, 0, r, r),
        r_full.as_ref().submatrix(0, r, r, n - r),
    );
    let p = Mat::from_fn(r, n, |i, j| {
        if j < r {
            (i == j) as u8 as f64
        } else {
            t[(i, j - r)]
        }
    });
    // E = K' - K'[:, :r] P, then E + shift I.
    let mut e = &kp - kp.as_ref().submatrix(0, 0, n, r) * &p;
    for i in 0..n {
        e[(i, i)] += shift;
    }
    let x = linalg::lu_solve(e.as_ref(), p.transpose())?;
    Ok(Some((piv[..r].to_vec(), &p * &x)))
}

/// Steps 5: `M = (S^-1 + K_SS)^-1 = S - S K_SS (I + S K_SS)^-1 S` (S may be singular, e.g.
/// block-diagonal with zero padding).
pub(crate) fn combine(s: &Mat<f64>, k_ss: &Mat<f64>) -> Result<Mat<f64>, CurvatureError> {
    let r = s.nrows();
    let s_kss = s * k_ss;
    let y = linalg::lu_solve((Mat::<f64>::identity(r, r) + &s_kss).as_ref(), s.as_ref())?;
    let m = s - &s_kss * &y;
    if !linalg::all_finite(m.as_ref()) {
        return Err(CurvatureError::NonFinite {
            what: "KID middle matrix M",
        });
    }
    Ok(m)
}
