//! KIS: Kronecker importance sampling (HyLo).
//!
//! Keeps r = max(1, ceil(rho n)) rows sampled without replacement with probability proportional to
//! K_ii = |a_i|^2 |g_i|^2 (rows of zero weight are never chosen), then applies SNGD to them with
//! n := r (no reweighting, as in the paper), also when fewer than r rows had weight: with rho = 1
//! KIS is SNGD, zero-gradient samples included.

use burn::tensor::backend::Backend;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::lowrank::LowRankState;
use super::sngd;
use crate::error::CurvatureError;
use crate::rows::PerSampleRows;

/// Number of rows kept for compression ratio `rho` out of `n`.
pub fn kept_rows(rho: f64, n: usize) -> usize {
    ((rho * n as f64).ceil() as usize).clamp(1, n.max(1))
}

/// Samples `r` distinct indices with probability proportional to `weights`; zero, negative and
/// non-finite weights are never chosen; if fewer than `r` weights are positive, all of those are
/// returned. The result is sorted.
pub fn sample_indices(weights: &[f64], r: usize, seed: u64) -> Vec<usize> {
    let candidates: Vec<usize> = (0..weights.len())
        .filter(|&i| weights[i].is_finite() && weights[i] > 0.0)
        .collect();
    if candidates.len() <= r {
        return candidates;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let chosen = rand::seq::index::sample_weighted(
        &mut rng,
        candidates.len(),
        |k| weights[candidates[k]],
        r,
    )
    .expect("weights are positive and finite");
    let mut out: Vec<usize> = chosen.into_iter().map(|k| candidates[k]).collect();
    out.sort_unstable();
    out
}

/// Builds the KIS state of one layer from its per-sample rows.
pub fn refresh<B: Backend>(
    rows: PerSampleRows<B>,
    damping: f64,
    rho: f64,
    seed: u64,
) -> Result<LowRankState<B>, CurvatureError> {
    let n = rows.len();
    if n == 0 {
        return Ok(LowRankState::identity(damping));
    }
    let weights = crate::host::read_f64(rows.squared_norms());
    let r = kept_rows(rho, n);
    let indices = sample_indices(&weights, r, seed);
    if indices.is_empty() {
        return Ok(LowRankState::identity(damping));
    }
    let kept = if indices.len() == n {
        rows
    } else {
        rows.select(&indices)
    };
    sngd::refresh_normalised(kept, damping, r)
}
