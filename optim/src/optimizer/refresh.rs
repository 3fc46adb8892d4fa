//! Curvature refresh: turns the captures of a curvature step into each layer's new state.
//!
//! There is one refresh path. A single process runs it with the `Single` communicator, whose
//! collectives are the identity (and which skips the host packing a real all-gather needs), so
//! the distributed tests' P = 1 reference checks the code every user runs.

use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use super::{Curvature, LayerMeta, LayerState, Method, NaturalGradient};
use crate::capture::LayerCapture;
use crate::comm::CommBytes;
use crate::host;
use crate::precond::{HyloMode, LowRankState};

/// Layers whose refresh failed, with the reason.
pub(super) type Failures = Vec<(ParamId, String)>;

/// How a worker compresses its local rows before the all-gather.
#[derive(Clone, Copy, Debug)]
pub(super) enum Compression {
    /// SNGD: all rows.
    Full,
    /// KIS: r rows sampled by `|a|^2 |g|^2`.
    Kis { rho: f64, seed: u64 },
    /// KID: r skeleton rows of the local kernel and its `S_mat_p`.
    Kid { rho: f64 },
}

impl<B: AutodiffBackend> NaturalGradient<B> {
    /// Refreshes the captured layers (K-FAC inverts its factors when `inversion`); returns the
    /// layers whose refresh failed (they keep their last good curvature) and the bytes moved
    /// between workers.
    pub(super) fn refresh(
        &mut self,
        captures: Vec<LayerCapture<B::InnerBackend>>,
        grads: &GradientsParams,
        inversion: bool,
    ) -> (Failures, CommBytes) {
        // The blocks stack the curvature about to change: built again at this step's update.
        self.blocks = None;
        for capture in &captures {
            let damping = self.damping;
            self.layers
                .entry(capture.weight_id.val())
                .or_insert_with(|| LayerState {
                    meta: LayerMeta {
                        weight_id: capture.weight_id,
                        bias_id: capture.bias_id,
                        geometry: capture.geometry.clone(),
                    },
                    curvature: Curvature::LowRank(LowRankState::identity(damping)),
                });
        }
        let comm = self.comm.clone();
        match self.method.clone() {
            Method::Sngd => {
                self.advance_damping();
                self.refresh_low_rank(&captures, Compression::Full, comm.as_ref())
            }
            Method::Hylo { rho, switch, seed } => {
                self.advance_damping();
                let norm = gradient_norm::<B>(&captures, &self.layers, grads);
                let mode = switch.mode(self.step, norm, self.last_grad_norm);
                self.last_grad_norm = Some(norm);
                self.mode = Some(mode);
                let compression = match mode {
                    HyloMode::Kid => Compression::Kid { rho },
                    HyloMode::Kis => Compression::Kis { rho, seed },
                };
                self.refresh_low_rank(&captures, compression, comm.as_ref())
            }
            Method::Kfac {
                factor_decay,
                method,
                ..
            } => {
                if inversion {
                    self.advance_damping();
                }
                self.refresh_kfac(&captures, factor_decay, inversion, method, comm.as_ref())
            }
        }
    }

    /// The damping for the inversion about to happen: the schedule's value (adaptive damping
    /// has already set it from the period that ended at this step).
    fn advance_damping(&mut self) {
        if !self.config.damping.adaptive {
            self.damping = self.config.damping.value_after(self.refreshes);
        }
        self.refreshes += 1;
    }
}

/// Norm of the gradients of the captured layers (one host read).
fn gradient_norm<B: AutodiffBackend>(
    captures: &[LayerCapture<B::InnerBackend>],
    layers: &std::collections::BTreeMap<u64, LayerState<B::InnerBackend>>,
    grads: &GradientsParams,
) -> f64 {
    let squares: Vec<Tensor<B::InnerBackend, 1>> = captures
        .iter()
        .filter_map(|c| layers.get(&c.weight_id.val()))
        .filter_map(|layer| layer.meta.gradient::<B::InnerBackend>(grads))
        .map(|g| g.powi_scalar(2).sum())
        .collect();
    if squares.is_empty() {
        return 0.0;
    }
    host::read_scalar(Tensor::cat(squares, 0).sum()).sqrt()
}
