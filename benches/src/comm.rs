//! Communication volume per curvature refresh of distributed K-FAC (KAISA) and HyLo, from the
//! layer shapes (ALGORITHMS.md, "Distributed HyLo"), and the memory each optimizer's state holds.

use serde::Serialize;

use crate::layers::LayerCase;

/// Bytes of one f32.
pub const F32: u64 = 4;

/// Bytes moved per refresh at `workers` workers.
#[derive(Clone, Debug, Serialize)]
pub struct CommVolume {
    /// Workers P.
    pub workers: usize,
    /// K-FAC: factors all-reduced, `sum (d_in'^2 + d_out^2)` floats.
    pub kfac_bytes: u64,
    /// HyLo: all-gather of `r P (d_in' + d_out)` plus broadcast of `(r P)^2` floats per layer.
    pub hylo_bytes: u64,
}

impl CommVolume {
    /// K-FAC bytes / HyLo bytes.
    pub fn ratio(&self) -> f64 {
        self.kfac_bytes as f64 / self.hylo_bytes.max(1) as f64
    }
}

/// Volumes for `cases` (with multiplicities) at a local batch of `local_batch` and ratio `rho`.
pub fn comm_volume(
    cases: &[LayerCase],
    workers: usize,
    local_batch: usize,
    rho: f64,
) -> CommVolume {
    let r = hylo_optim::precond::kis::kept_rows(rho, local_batch) as u64;
    let p = workers as u64;
    let mut kfac = 0;
    let mut hylo = 0;
    for c in cases {
        let (din, dout, k) = (c.d_in as u64, c.d_out as u64, c.count as u64);
        kfac += k * (din * din + dout * dout);
        hylo += k * (r * p * (din + dout) + (r * p) * (r * p));
    }
    CommVolume {
        workers,
        kfac_bytes: kfac * F32,
        hylo_bytes: hylo * F32,
    }
}

/// Bytes of optimizer state beyond the parameters, after a refresh at batch `n`.
#[derive(Clone, Debug, Serialize)]
pub struct StateMemory {
    /// Momentum buffers (one per parameter; every optimizer here has them).
    pub momentum: u64,
    /// K-FAC: factors A, G and their eigenvectors and eigenvalues.
    pub kfac: u64,
    /// SNGD: all n rows (a_i, g_i) and the n x n matrix M.
    pub sngd: u64,
    /// HyLo: r kept rows and the r x r matrix M.
    pub hylo: u64,
}

/// State memory for `cases` with `params` parameters, batch `n`, ratio `rho`.
pub fn state_memory(cases: &[LayerCase], params: usize, n: usize, rho: f64) -> StateMemory {
    let r = hylo_optim::precond::kis::kept_rows(rho, n) as u64;
    let n = n as u64;
    let (mut kfac, mut sngd, mut hylo) = (0, 0, 0);
    for c in cases {
        let (din, dout, k) = (c.d_in as u64, c.d_out as u64, c.count as u64);
        kfac += k * (2 * (din * din + dout * dout) + din + dout);
        sngd += k * (n * (din + dout) + n * n);
        hylo += k * (r * (din + dout) + r * r);
    }
    StateMemory {
        momentum: params as u64 * F32,
        kfac: kfac * F32,
        sngd: sngd * F32,
        hylo: hylo * F32,
    }
}
