//! What a step did, for logs and tests. The parts decided on the device (was the step skipped,
//! which directions fell back, the KL-clipping scale) are read only when the report is asked for,
//! so a step itself needs no host round trip.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use burn::module::ParamId;
use burn::tensor::{backend::Backend, Tensor};

use crate::comm::CommBytes;
use crate::host;
use crate::precond::HyloMode;

/// What happened in the last step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepReport {
    /// The step's index (0-based).
    pub step: usize,
    /// Whether curvature was refreshed (or K-FAC factors updated).
    pub refreshed: bool,
    /// Whether the update was skipped because a gradient held NaN or Inf (weights and momentum
    /// untouched; the step still counts for the schedules).
    pub skipped: bool,
    /// HyLo's mode at the last refresh.
    pub mode: Option<HyloMode>,
    /// The damping in force.
    pub damping: f64,
    /// The step-length factor on the learning rate in force (see
    /// [`super::StepLengthConfig`]; 0 in a report that has not set it).
    pub step_scale: f64,
    /// Layers that used the damped identity (g / lambda) or kept their last good curvature this
    /// step: (name, reason).
    pub fallbacks: Vec<(String, String)>,
    /// Parameters whose gradients held NaN or Inf (when `skipped`).
    pub non_finite: Vec<String>,
    /// The KL-clipping scale applied, when clipping is on.
    pub kl_scale: Option<f64>,
    /// Bytes this worker moved for the curvature refresh (zero when not distributed).
    pub comm: CommBytes,
    /// Adaptive damping: how the period that ended at this step was judged.
    pub period: Option<super::PeriodVerdict>,
}

/// A report whose device-side parts are read on first use.
#[derive(Clone)]
pub(super) struct PendingReport<B: Backend> {
    /// What the host already knows.
    pub known: StepReport,
    /// Parameter names, for messages.
    pub names: Arc<HashMap<ParamId, String>>,
    /// Parameters whose gradient was checked, in the order of `values`.
    pub params: Vec<ParamId>,
    /// Preconditioned layers (weight ids), in the order of `values` after the parameters.
    pub layers: Vec<ParamId>,
    /// Whether a KL-clipping scale ends `values`.
    pub kl: bool,
    /// `[0 * sum(g) per parameter, <v, g> per layer, kl scale]` (`[1]` each, concatenated only
    /// when the report is read): NaN/Inf marks a non-finite gradient or direction.
    pub values: Vec<Tensor<B, 1>>,
    pub resolved: OnceLock<StepReport>,
}

impl<B: Backend> PendingReport<B> {
    /// A report with nothing left to read.
    pub fn known(known: StepReport) -> Self {
        Self {
            known,
            names: Arc::default(),
            params: Vec::new(),
            layers: Vec::new(),
            kl: false,
            values: Vec::new(),
            resolved: OnceLock::new(),
        }
    }

    fn name(&self, id: &ParamId) -> String {
        self.names
            .get(id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    /// The full report (one blocking read the first time, none after).
    pub fn resolve(&self) -> &StepReport {
        self.resolved.get_or_init(|| {
            let mut report = self.known.clone();
            if self.values.is_empty() {
                return report;
            }
            let values = host::read_f64(Tensor::cat(self.values.clone(), 0));
            let (params, rest) = values.split_at(self.params.len());
            let (layers, rest) = rest.split_at(self.layers.len());
            report.non_finite = self
                .params
                .iter()
                .zip(params)
                .filter(|(_, v)| !v.is_finite())
                .map(|(id, _)| self.name(id))
                .collect();
            report.skipped = !report.non_finite.is_empty();
            if report.skipped {
                tracing::warn!(step = report.step, params = ?report.non_finite,
                    "NaN or Inf in gradients: update skipped");
                return report;
            }
            for (id, vg) in self.layers.iter().zip(layers) {
                if !vg.is_finite() {
                    let name = self.name(id);
                    tracing::warn!(layer = %name, "non-finite preconditioned direction: damped identity used");
                    report
                        .fallbacks
                        .push((name, "non-finite direction: damped identity".into()));
                }
            }
            if self.kl {
                report.kl_scale = rest.first().copied();
            }
            report
        })
    }
}
