//! Distributed curvature refresh (ALGORITHMS.md, "Distributed HyLo"; KAISA for K-FAC).
//!
//! SNGD / HyLo: every worker compresses its local rows of every layer (SNGD keeps all, KIS
//! samples r, KID keeps r skeleton rows and its `S_mat_p`), one all-gather moves the compressed
//! rows of all layers, each layer's owner (longest processing time first) builds and factorises
//! the gathered kernel and broadcasts the `rP x rP` matrix M, and every worker preconditions
//! every layer. K-FAC: the batch factors are all-reduced (mean); each layer's owner computes the
//! eigendecompositions and broadcasts them. Every worker ends with bit-identical state.

use std::sync::Arc;

use burn::module::ParamId;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use faer::Mat;

use super::{Curvature, NaturalGradient};
use crate::capture::LayerCapture;
use crate::comm::{assign_owners, CommBytes, Communicator, Counted};
use crate::factors::{kfac_factors, per_sample_rows};
use crate::linalg;
use crate::precond::{kid, kis, sngd, KfacState, LowRankState};
use crate::rows::PerSampleRows;

/// How a worker compresses its local rows before the all-gather.
#[derive(Clone, Copy, Debug)]
pub(super) enum Compression {
    /// SNGD: all rows.
    Full,
    /// KIS: r rows sampled by `|a|^2 |g|^2`, with a per-layer seed.
    Kis { rho: f64, seed: u64 },
    /// KID: r skeleton rows of the local kernel and its `S_mat_p`.
    Kid { rho: f64 },
}

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("float tensor")
}

fn from_vec<B: Backend>(
    values: Vec<f32>,
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    Tensor::from_data(
        TensorData::new(values, [rows, cols]).convert::<B::FloatElem>(),
        device,
    )
}

/// Column widths of a layer's rows: `[d_in', d_out]` (Kronecker) or `[d_out d_in']` (dense).
fn widths<B: Backend>(rows: &PerSampleRows<B>) -> Vec<usize> {
    match rows {
        PerSampleRows::Kronecker { a, g } => vec![a.dims()[1], g.dims()[1]],
        PerSampleRows::Dense { j, .. } => vec![j.dims()[1]],
    }
}

/// The row blocks of `rows` on the host, each padded with zero rows to `r` rows.
fn pack_rows<B: Backend>(
    rows: Option<&PerSampleRows<B>>,
    widths: &[usize],
    r: usize,
    out: &mut Vec<f32>,
) {
    let blocks: Vec<Vec<f32>> = match rows {
        Some(PerSampleRows::Kronecker { a, g }) => vec![to_vec(a.clone()), to_vec(g.clone())],
        Some(PerSampleRows::Dense { j, .. }) => vec![to_vec(j.clone())],
        None => widths.iter().map(|_| Vec::new()).collect(),
    };
    for (block, &w) in blocks.into_iter().zip(widths) {
        let len = block.len();
        out.extend(block);
        out.extend(std::iter::repeat_n(0.0, r * w - len));
    }
}

struct LayerPlan {
    widths: Vec<usize>,
    d_out: usize,
    r: usize,
    /// Offset of the layer's segment inside one worker's packed buffer, and its length.
    offset: usize,
    len: usize,
}

impl<B: AutodiffBackend> NaturalGradient<B> {
    /// Runs the optimizer's curvature work across the workers of `comm` (data parallel: every
    /// worker passes its own batch shard and the all-reduced mean gradient to `step`).
    pub fn with_communicator(mut self, comm: Arc<dyn Communicator>) -> Self {
        self.comm = Some(comm);
        self
    }

    /// The communicator, when distributed.
    pub fn communicator(&self) -> Option<&Arc<dyn Communicator>> {
        self.comm.as_ref()
    }

    /// Distributed SNGD / KIS / KID refresh; returns the failed layers and the bytes moved.
    pub(super) fn refresh_low_rank_distributed(
        &mut self,
        captures: &[LayerCapture<B::InnerBackend>],
        compression: Compression,
        comm: &dyn Communicator,
    ) -> (Vec<(ParamId, String)>, CommBytes) {
        let comm = Counted::new(comm);
        let (workers, rank) = (comm.size(), comm.rank());
        let damping = self.damping;
        let mode = self.config.conv_mode;
        let mut packed = Vec::new();
        let mut plans = Vec::new();
        let mut failures = Vec::new();
        for (index, capture) in captures.iter().enumerate() {
            let rows = per_sample_rows(capture, mode);
            let b = rows.len();
            let widths = widths(&rows);
            let d_out = match &rows {
                PerSampleRows::Kronecker { g, .. } => g.dims()[1],
                PerSampleRows::Dense { d_out, .. } => *d_out,
            };
            let offset = packed.len();
            let r = match compression {
                Compression::Full => b,
                Compression::Kis { rho, .. } | Compression::Kid { rho } => kis::kept_rows(rho, b),
            };
            match compression {
                Compression::Full => pack_rows(Some(&rows), &widths, r, &mut packed),
                Compression::Kis { seed, .. } => {
                    let weights: Vec<f64> = to_vec(rows.squared_norms())
                        .into_iter()
                        .map(f64::from)
                        .collect();
                    let seed = seed
                        ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        ^ (rank as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    let kept = kis::sample_indices(&weights, r, seed);
                    let selected = (!kept.is_empty()).then(|| rows.select(&kept));
                    pack_rows(selected.as_ref(), &widths, r, &mut packed);
                }
                Compression::Kid { .. } => {
                    let kernel = linalg::to_host(rows.kernel());
                    let shift = (b * workers) as f64 * damping;
                    let local = if linalg::all_finite(kernel.as_ref()) {
                        kid::local_skeleton(&kernel, shift, r).unwrap_or_else(|e| {
                            failures.push((capture.weight_id, e.to_string()));
                            None
                        })
                    } else {
                        None
                    };
                    let (selected, s) = match local {
                        Some((skeleton, s)) => (Some(rows.select(&skeleton)), s),
                        None => (None, Mat::zeros(0, 0)),
                    };
                    pack_rows(selected.as_ref(), &widths, r, &mut packed);
                    // S_mat_p padded to r x r.
                    let k = s.nrows();
                    packed.extend((0..r * r).map(|i| {
                        let (row, col) = (i / r, i % r);
                        if row < k && col < k {
                            s[(row, col)] as f32
                        } else {
                            0.0
                        }
                    }));
                }
            }
            plans.push(LayerPlan {
                widths,
                d_out,
                r,
                offset,
                len: packed.len() - offset,
            });
        }
        let gathered = comm.all_gather(&packed);
        let per_worker = packed.len();
        let costs: Vec<f64> = plans
            .iter()
            .map(|p| {
                let n = (p.r * workers) as f64;
                n * n * p.widths.iter().sum::<usize>() as f64 + n * n * n
            })
            .collect();
        let owners = assign_owners(&costs, workers);
        for ((capture, plan), &owner) in captures.iter().zip(&plans).zip(&owners) {
            let device = capture.output_grad.device();
            let n = plan.r * workers;
            // Rows of every worker, in rank order.
            let mut blocks: Vec<Vec<f32>> = plan.widths.iter().map(|_| Vec::new()).collect();
            let mut s_blocks = Vec::new();
            for w in 0..workers {
                let mut at = w * per_worker + plan.offset;
                for (block, &width) in blocks.iter_mut().zip(&plan.widths) {
                    block.extend_from_slice(&gathered[at..at + plan.r * width]);
                    at += plan.r * width;
                }
                if matches!(compression, Compression::Kid { .. }) {
                    s_blocks.push(gathered[at..at + plan.r * plan.r].to_vec());
                }
                debug_assert!(
                    at + s_blocks.last().map_or(0, Vec::len)
                        <= w * per_worker + plan.offset + plan.len
                );
            }
            let rows = match &plan.widths[..] {
                [da, dg] => PerSampleRows::Kronecker {
                    a: from_vec(blocks[0].clone(), n, *da, &device),
                    g: from_vec(blocks[1].clone(), n, *dg, &device),
                },
                [dj] => PerSampleRows::Dense {
                    j: from_vec(blocks[0].clone(), n, *dj, &device),
                    d_out: plan.d_out,
                },
                _ => unreachable!("rows have one or two blocks"),
            };
            let mut m = vec![f32::NAN; n * n];
            if owner == rank {
                let kernel = linalg::to_host(rows.kernel());
                let result = match compression {
                    Compression::Full | Compression::Kis { .. } => {
                        sngd::damped_kernel_inverse(kernel, n as f64 * damping)
                    }
                    Compression::Kid { .. } => {
                        let s = Mat::from_fn(n, n, |i, j| {
                            let (bi, bj) = (i / plan.r, j / plan.r);
                            if bi == bj {
                                s_blocks[bi][(i % plan.r) * plan.r + j % plan.r] as f64
                            } else {
                                0.0
                            }
                        });
                        kid::combine(&s, &kernel)
                    }
                };
                if let Ok(host) = result {
                    m = (0..n * n).map(|i| host[(i / n, i % n)] as f32).collect();
                }
            }
            comm.broadcast(&mut m, owner);
            let layer = self
                .layers
                .get_mut(&capture.weight_id.val())
                .expect("registered before refresh");
            if m.iter().all(|v| v.is_finite()) {
                layer.curvature = Curvature::LowRank(LowRankState {
                    m: Some(from_vec(m, n, n, &device)),
                    rows: Some(rows),
                    damping,
                });
            } else {
                layer.curvature = Curvature::Empty;
                failures.push((
                    capture.weight_id,
                    format!("factorisation failed on worker {owner}"),
                ));
            }
        }
        (failures, comm.bytes.get())
    }

    /// Distributed K-FAC refresh (KAISA): factors all-reduced, eigendecompositions by owners.
    pub(super) fn refresh_kfac_distributed(
        &mut self,
        captures: &[LayerCapture<B::InnerBackend>],
        factor_decay: f64,
        invert: bool,
        comm: &dyn Communicator,
    ) -> (Vec<(ParamId, String)>, CommBytes) {
        let comm = Counted::new(comm);
        let (workers, rank) = (comm.size(), comm.rank());
        let mut packed = Vec::new();
        let mut dims = Vec::new();
        for capture in captures {
            let (a, g) = kfac_factors(capture);
            dims.push((a.dims()[0], g.dims()[0]));
            packed.extend(to_vec(a));
            packed.extend(to_vec(g));
        }
        comm.all_reduce_sum(&mut packed);
        let scale = 1.0 / workers as f32;
        let mut at = 0;
        let mut needs = Vec::new();
        for (capture, &(da, dg)) in captures.iter().zip(&dims) {
            let device = capture.output_grad.device();
            let a = from_vec::<B::InnerBackend>(
                packed[at..at + da * da].iter().map(|v| v * scale).collect(),
                da,
                da,
                &device,
            );
            at += da * da;
            let g = from_vec::<B::InnerBackend>(
                packed[at..at + dg * dg].iter().map(|v| v * scale).collect(),
                dg,
                dg,
                &device,
            );
            at += dg * dg;
            let layer = self
                .layers
                .get_mut(&capture.weight_id.val())
                .expect("registered before refresh");
            let state = match std::mem::replace(&mut layer.curvature, Curvature::Empty) {
                Curvature::Kfac(mut state) => {
                    state.update_factors(a, g, factor_decay);
                    state
                }
                _ => KfacState::new(a, g),
            };
            needs.push(invert || state.a_eigen.is_none());
            layer.curvature = Curvature::Kfac(state);
        }
        let costs: Vec<f64> = dims
            .iter()
            .map(|&(da, dg)| (da.pow(3) + dg.pow(3)) as f64)
            .collect();
        let owners = assign_owners(&costs, workers);
        let mut failures = Vec::new();
        for (((capture, &(da, dg)), &owner), &need) in
            captures.iter().zip(&dims).zip(&owners).zip(&needs)
        {
            if !need {
                continue;
            }
            let layer = self
                .layers
                .get_mut(&capture.weight_id.val())
                .expect("registered");
            let Curvature::Kfac(state) = &mut layer.curvature else {
                unreachable!("set above")
            };
            let mut buf = vec![f32::NAN; da * da + da + dg * dg + dg];
            if owner == rank {
                let mut local = state.clone();
                if local.update_inverses().is_ok() {
                    let (qa, ea) = local.a_eigen.expect("computed");
                    let (qg, eg) = local.g_eigen.expect("computed");
                    buf = [to_vec(qa), to_vec(ea), to_vec(qg), to_vec(eg)].concat();
                }
            }
            comm.broadcast(&mut buf, owner);
            if buf.iter().all(|v| v.is_finite()) {
                let device = capture.output_grad.device();
                let (qa, rest) = buf.split_at(da * da);
                let (ea, rest) = rest.split_at(da);
                let (qg, eg) = rest.split_at(dg * dg);
                state.a_eigen = Some((
                    from_vec(qa.to_vec(), da, da, &device),
                    from_vec(ea.to_vec(), 1, da, &device),
                ));
                state.g_eigen = Some((
                    from_vec(qg.to_vec(), dg, dg, &device),
                    from_vec(eg.to_vec(), dg, 1, &device),
                ));
            } else {
                failures.push((
                    capture.weight_id,
                    format!("eigendecomposition failed on worker {owner}"),
                ));
            }
        }
        (failures, comm.bytes.get())
    }
}
