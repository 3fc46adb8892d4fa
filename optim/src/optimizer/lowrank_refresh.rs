//! SNGD / KIS / KID refresh across P workers (ALGORITHMS.md, "Distributed HyLo"; P = 1 with the
//! `Single` communicator).
//!
//! Every worker compresses its local rows of every layer (SNGD keeps all b, KIS samples r, KID
//! keeps r skeleton rows and its `S_mat_p`); one all-gather moves the compressed rows of all
//! layers; each layer's owner (longest processing time first) builds and factorises the
//! gathered kernel and broadcasts the matrix M; every worker then preconditions every layer.
//! With one worker the gather and broadcast are the identity and the rows never leave the
//! device: only the kernel goes to the host.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use faer::Mat;

use super::refresh::{Compression, Failures};
use super::{Curvature, NaturalGradient};
use crate::capture::LayerCapture;
use crate::comm::{assign_owners, CommBytes, Communicator, Counted};
use crate::factors::per_sample_rows;
use crate::host;
use crate::linalg;
use crate::precond::{kid, kis, sngd, FisherWeights, LowRankState};
use crate::rows::PerSampleRows;

/// One worker's compressed rows of one layer.
struct Local<B: Backend> {
    /// Kept rows (at most `r`); `None` when none are kept (zero curvature, or a failure).
    rows: Option<PerSampleRows<B>>,
    /// KID's `S_mat_p` (k x k for the k <= r skeleton rows).
    s: Option<Mat<f64>>,
    /// Rows each worker contributes: b (SNGD) or r.
    r: usize,
    /// Local batch b.
    b: usize,
    /// Column widths: `[d_in', d_out]` (Kronecker) or `[d_out d_in']` (dense).
    widths: Vec<usize>,
    d_out: usize,
}

/// The rows of all workers of one layer and, for KID, the block-diagonal `S_mat`.
struct Gathered<B: Backend> {
    rows: Option<PerSampleRows<B>>,
    s: Option<Mat<f64>>,
}

fn widths<B: Backend>(rows: &PerSampleRows<B>) -> (Vec<usize>, usize) {
    match rows {
        PerSampleRows::Kronecker { a, g } => (vec![a.dims()[1], g.dims()[1]], g.dims()[1]),
        PerSampleRows::Dense { j, d_out } => (vec![j.dims()[1]], *d_out),
    }
}

fn from_vec<B: Backend>(
    values: Vec<f32>,
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    crate::host::upload_floats(values, [rows, cols], device)
}

/// Appends a layer's local rows (padded with zero rows to `r`) and, for KID, its `S_mat_p`
/// (padded to r x r) to `out`.
fn pack<B: Backend>(local: &Local<B>, kid: bool, out: &mut Vec<f32>) {
    let blocks: Vec<Vec<f32>> = match &local.rows {
        Some(PerSampleRows::Kronecker { a, g }) => {
            vec![host::read_f32(a.clone()), host::read_f32(g.clone())]
        }
        Some(PerSampleRows::Dense { j, .. }) => vec![host::read_f32(j.clone())],
        None => local.widths.iter().map(|_| Vec::new()).collect(),
    };
    for (block, &w) in blocks.into_iter().zip(&local.widths) {
        let len = block.len();
        out.extend(block);
        out.extend(std::iter::repeat_n(0.0, local.r * w - len));
    }
    if kid {
        let r = local.r;
        let k = local.s.as_ref().map_or(0, |s| s.nrows());
        out.extend((0..r * r).map(|i| {
            let (row, col) = (i / r, i % r);
            match &local.s {
                Some(s) if row < k && col < k => s[(row, col)] as f32,
                _ => 0.0,
            }
        }));
    }
}

fn packed_len<B: Backend>(local: &Local<B>, kid: bool) -> usize {
    local.r * local.widths.iter().sum::<usize>() + if kid { local.r * local.r } else { 0 }
}

impl<B: AutodiffBackend> NaturalGradient<B> {
    /// SNGD / KIS / KID refresh; returns the failed layers and the bytes moved.
    pub(super) fn refresh_low_rank(
        &mut self,
        captures: &[LayerCapture<B::InnerBackend>],
        compression: Compression,
        comm: &dyn Communicator,
    ) -> (Failures, CommBytes) {
        let comm = Counted::new(comm);
        let (workers, rank) = (comm.size(), comm.rank());
        let damping = self.damping;
        let kid = matches!(compression, Compression::Kid { .. });
        let mut failures = Vec::new();

        // 1. Local compression.
        let locals: Vec<Local<B::InnerBackend>> = captures
            .iter()
            .enumerate()
            .map(|(index, capture)| {
                let rows = per_sample_rows(capture, self.config.conv_mode);
                let b = rows.len();
                let (widths, d_out) = widths(&rows);
                let mut local = Local {
                    rows: None,
                    s: None,
                    r: b,
                    b,
                    widths,
                    d_out,
                };
                match compression {
                    Compression::Full => local.rows = Some(rows),
                    Compression::Kis { rho, seed } => {
                        local.r = kis::kept_rows(rho, b);
                        let weights = host::read_f64(rows.squared_norms());
                        let seed = mix_seed(seed, self.step as u64, index as u64, rank as u64);
                        let kept = kis::sample_indices(&weights, local.r, seed);
                        local.rows = match kept.len() {
                            0 => None,
                            k if k == b => Some(rows),
                            _ => Some(rows.select(&kept)),
                        };
                    }
                    Compression::Kid { rho } => {
                        local.r = kis::kept_rows(rho, b);
                        let kernel = linalg::to_host(rows.kernel());
                        let shift = (b * workers) as f64 * damping;
                        let skeleton = if linalg::all_finite(kernel.as_ref()) {
                            kid::local_skeleton(&kernel, shift, local.r)
                        } else {
                            Err(crate::error::CurvatureError::NonFinite { what: "kernel K" })
                        };
                        match skeleton {
                            Ok(Some((skeleton, s))) => {
                                local.rows = Some(rows.select(&skeleton));
                                local.s = Some(s);
                            }
                            Ok(None) => {}
                            Err(e) => failures.push((capture.weight_id, e.to_string())),
                        }
                    }
                }
                local
            })
            .collect();

        // 2. All-gather (the identity for one worker).
        let gathered: Vec<Gathered<B::InnerBackend>> = if workers == 1 {
            locals
                .iter()
                .map(|l| Gathered {
                    rows: l.rows.clone(),
                    s: l.s.clone(),
                })
                .collect()
        } else {
            let mut packed = Vec::new();
            for local in &locals {
                pack(local, kid, &mut packed);
            }
            let all = comm.all_gather(&packed);
            let per_worker = packed.len();
            let mut offset = 0;
            locals
                .iter()
                .zip(captures)
                .map(|(local, capture)| {
                    let g = unpack::<B::InnerBackend>(
                        local,
                        kid,
                        &all,
                        per_worker,
                        offset,
                        workers,
                        &capture.output_grad.device(),
                    );
                    offset += packed_len(local, kid);
                    g
                })
                .collect()
        };

        // 3. Owners factorise; M is broadcast (the identity for one worker).
        let costs: Vec<f64> = locals
            .iter()
            .map(|l| {
                let n = (l.r * workers) as f64;
                n * n * l.widths.iter().sum::<usize>() as f64 + n * n * n
            })
            .collect();
        let owners = assign_owners(&costs, workers);
        for (((capture, local), gathered), &owner) in
            captures.iter().zip(&locals).zip(gathered).zip(&owners)
        {
            let layer = self
                .layers
                .get_mut(&capture.weight_id.val())
                .expect("registered before refresh");
            let Some(rows) = gathered.rows else {
                // No curvature at all (zero gradients, or every worker's rows failed).
                if workers == 1 && !failures.iter().any(|f| f.0 == capture.weight_id) {
                    layer.curvature = Curvature::LowRank(LowRankState::identity(damping));
                }
                continue;
            };
            let n = rows.len();
            // The sample count of the shift `count * lambda`. KIS: n := r per worker
            // (ALGORITHMS.md), whatever number of rows had weight.
            let count = match compression {
                Compression::Full | Compression::Kis { .. } => local.r * workers,
                Compression::Kid { .. } => local.b * workers,
            };
            let shift = count as f64 * damping;
            let mut m: Option<Mat<f64>> = None;
            if owner == rank {
                let kernel = linalg::to_host(rows.kernel());
                let result = match &gathered.s {
                    Some(s) if kid => kid::combine(s, &kernel),
                    _ => sngd::damped_kernel_inverse(kernel, shift),
                };
                match result {
                    Ok(host) => m = Some(host),
                    Err(e) => failures.push((capture.weight_id, e.to_string())),
                }
            }
            let device = rows.device();
            let fisher = match (&gathered.s, compression) {
                (Some(s), Compression::Kid { .. }) => {
                    FisherWeights::Matrix(linalg::to_device::<B::InnerBackend>(
                        Mat::from_fn(n, n, |i, j| s[(i, j)] * damping).as_ref(),
                        &device,
                    ))
                }
                _ => FisherWeights::Mean(count),
            };
            let m = if workers == 1 {
                m.map(|m| linalg::to_device::<B::InnerBackend>(m.as_ref(), &device))
            } else {
                let mut buf = match &m {
                    Some(m) => (0..n * n).map(|i| m[(i / n, i % n)] as f32).collect(),
                    None => vec![f32::NAN; n * n],
                };
                comm.broadcast(&mut buf, owner);
                if buf.iter().all(|v| v.is_finite()) {
                    Some(from_vec(buf, n, n, &device))
                } else {
                    if owner != rank {
                        failures.push((
                            capture.weight_id,
                            format!("factorisation failed on worker {owner}"),
                        ));
                    }
                    None
                }
            };
            if let Some(m) = m {
                layer.curvature = Curvature::LowRank(LowRankState {
                    m: Some(m),
                    rows: Some(rows),
                    damping,
                    fisher,
                });
            }
        }
        (failures, comm.bytes.get())
    }
}

/// The rows of layer `local` from every worker's segment of the all-gather, in rank order (each
/// worker's block padded to r rows), and KID's block-diagonal `S_mat`.
fn unpack<B: Backend>(
    local: &Local<B>,
    kid: bool,
    all: &[f32],
    per_worker: usize,
    offset: usize,
    workers: usize,
    device: &B::Device,
) -> Gathered<B> {
    let r = local.r;
    let n = r * workers;
    let mut blocks: Vec<Vec<f32>> = local.widths.iter().map(|_| Vec::new()).collect();
    let mut s_blocks = Vec::new();
    for w in 0..workers {
        let mut at = w * per_worker + offset;
        for (block, &width) in blocks.iter_mut().zip(&local.widths) {
            block.extend_from_slice(&all[at..at + r * width]);
            at += r * width;
        }
        if kid {
            s_blocks.push(&all[at..at + r * r]);
        }
    }
    let rows = match &local.widths[..] {
        [da, dg] => PerSampleRows::Kronecker {
            a: from_vec(blocks[0].clone(), n, *da, device),
            g: from_vec(blocks[1].clone(), n, *dg, device),
        },
        [dj] => PerSampleRows::Dense {
            j: from_vec(blocks[0].clone(), n, *dj, device),
            d_out: local.d_out,
        },
        _ => unreachable!("rows have one or two blocks"),
    };
    let s = kid.then(|| {
        Mat::from_fn(n, n, |i, j| {
            let (bi, bj) = (i / r, j / r);
            if bi == bj {
                s_blocks[bi][(i % r) * r + j % r] as f64
            } else {
                0.0
            }
        })
    });
    Gathered {
        rows: Some(rows),
        s,
    }
}

/// A seed for one KIS draw: SplitMix64 of the run's seed, the step, the layer and the worker.
fn mix_seed(seed: u64, step: u64, layer: u64, rank: u64) -> u64 {
    let mut z = seed
        ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ layer.wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ rank.wrapping_mul(0x94D0_49BB_1331_11EB);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
