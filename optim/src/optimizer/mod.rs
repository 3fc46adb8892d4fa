//! The Burn `Optimizer<M, B>` that runs SNGD, K-FAC or HyLo on captured layers and SGD with
//! momentum on every other parameter.
//!
//! A curvature step is requested by the optimizer itself: after step s it arms the shared
//! [`CaptureHandle`] when step s + 1 is a curvature step (every `freq` steps, starting at 0), so
//! the training loop only has to route the gradients through the handle:
//!
//! ```text
//! let output = model.forward(x);            // wrappers record on curvature steps
//! let loss = ...;
//! let grads = capture.gradients(loss.backward(), &model);
//! model = optim.step(lr, model, grads);
//! ```
//!
//! In burn-train's `Learner`, do the same in `TrainStep::step`: build the `TrainOutput` from
//! `capture.gradients(loss.backward(), self)`.

mod config;
mod distributed;
mod layer_grad;
mod record;
mod refresh;
mod visitors;

use std::collections::BTreeMap;

use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, LearningRate, MultiGradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

pub use config::{CurvatureConfig, HyloConfig, KfacConfig, Method, SngdConfig};
pub use layer_grad::LayerMeta;
pub use record::NaturalGradientRecord;

use crate::capture::CaptureHandle;
use crate::error::ConfigError;
use crate::precond::{HyloMode, KfacState, LowRankState};
use visitors::{FiniteCheck, MergeGradients, MomentumUpdate, ParamNames};

/// What the optimizer holds for one preconditioned layer.
#[derive(Clone, Debug)]
pub enum Curvature<B: burn::tensor::backend::Backend> {
    /// Nothing usable yet (or the last refresh failed): the plain gradient is used.
    Empty,
    /// SNGD, KIS or KID state.
    LowRank(LowRankState<B>),
    /// K-FAC factors and eigendecompositions.
    Kfac(KfacState<B>),
}

/// One preconditioned layer: identity, shape and curvature.
#[derive(Clone, Debug)]
pub struct LayerState<B: burn::tensor::backend::Backend> {
    /// Which parameters the layer owns.
    pub meta: LayerMeta,
    /// Its curvature.
    pub curvature: Curvature<B>,
}

/// What happened in the last step, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepReport {
    /// The step's index (0-based).
    pub step: usize,
    /// Whether curvature was refreshed (or K-FAC factors updated).
    pub refreshed: bool,
    /// Whether the whole step was skipped because a gradient held NaN or Inf.
    pub skipped: bool,
    /// HyLo's mode at the last refresh.
    pub mode: Option<HyloMode>,
    /// The damping in force.
    pub damping: f64,
    /// Layers that used the plain gradient this step because of bad curvature: (name, reason).
    pub fallbacks: Vec<(String, String)>,
    /// Parameters whose gradients held NaN or Inf (when `skipped`).
    pub non_finite: Vec<String>,
    /// The KL-clipping scale applied, when clipping is on.
    pub kl_scale: Option<f64>,
    /// Bytes this worker moved for the curvature refresh (zero when not distributed).
    pub comm: crate::comm::CommBytes,
}

/// SNGD, K-FAC or HyLo as a Burn optimizer (see the module docs for the training loop).
#[derive(Clone)]
pub struct NaturalGradient<B: AutodiffBackend> {
    method: Method,
    config: CurvatureConfig,
    capture: CaptureHandle,
    step: usize,
    refreshes: usize,
    damping: f64,
    last_grad_norm: Option<f64>,
    mode: Option<HyloMode>,
    layers: BTreeMap<u64, LayerState<B::InnerBackend>>,
    momentum: BTreeMap<u64, Tensor<B::InnerBackend, 1>>,
    report: StepReport,
    comm: Option<std::sync::Arc<dyn crate::comm::Communicator>>,
}

impl<B: AutodiffBackend> NaturalGradient<B> {
    /// An optimizer running `method`; prefer the `*Config::init` constructors.
    pub fn new(
        method: Method,
        config: CurvatureConfig,
        capture: &CaptureHandle,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let damping = config.damping.initial;
        let optim = Self {
            method,
            config,
            capture: capture.clone(),
            step: 0,
            refreshes: 0,
            damping,
            last_grad_norm: None,
            mode: None,
            layers: BTreeMap::new(),
            momentum: BTreeMap::new(),
            report: StepReport::default(),
            comm: None,
        };
        optim.capture.arm(optim.is_curvature_step(0));
        Ok(optim)
    }

    /// The method this optimizer runs.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// The damping lambda in force.
    pub fn damping(&self) -> f64 {
        self.damping
    }

    /// HyLo's mode at the last refresh (`None` for SNGD and K-FAC, or before the first).
    pub fn mode(&self) -> Option<HyloMode> {
        self.mode
    }

    /// What happened in the last step.
    pub fn last_report(&self) -> &StepReport {
        &self.report
    }

    /// The preconditioned layers, by weight id.
    pub fn layers(&self) -> impl Iterator<Item = &LayerState<B::InnerBackend>> {
        self.layers.values()
    }

    /// Whether step `step` captures curvature.
    pub fn is_curvature_step(&self, step: usize) -> bool {
        step.is_multiple_of(self.config.freq)
    }

    fn step_inner<M: AutodiffModule<B>>(
        &mut self,
        lr: LearningRate,
        module: M,
        mut grads: GradientsParams,
    ) -> M {
        let captures = self.capture.take::<B::InnerBackend>();
        let mut report = StepReport {
            step: self.step,
            ..StepReport::default()
        };

        if let Some(bad) = non_finite_gradients::<B, M>(&module, &grads) {
            tracing::warn!(step = self.step, params = ?bad, "NaN or Inf in gradients: step skipped");
            report.skipped = true;
            report.non_finite = bad;
            report.damping = self.damping;
            report.mode = self.mode;
            self.report = report;
            // The step did not happen: ask for the same capture again.
            self.capture.arm(self.is_curvature_step(self.step));
            return module;
        }

        let names = || {
            let mut visitor = ParamNames::default();
            module.visit(&mut visitor);
            visitor.names
        };
        if !captures.is_empty() {
            report.refreshed = true;
            let (failures, bytes) = self.refresh(captures, &grads);
            report.comm = bytes;
            if !failures.is_empty() {
                let names = names();
                for (id, reason) in failures {
                    let name = names.get(&id).cloned().unwrap_or_else(|| id.to_string());
                    tracing::warn!(layer = %name, %reason, "curvature refresh failed: plain gradient used");
                    report.fallbacks.push((name, reason));
                }
            }
        } else if self.is_curvature_step(self.step) {
            tracing::warn!(
                step = self.step,
                "curvature step without captured layers: was the forward pass run with the \
                 capture wrappers, and the gradients routed through CaptureHandle::gradients?"
            );
        }

        let (failed, kl_scale) = self.precondition(lr, &mut grads);
        if !failed.is_empty() {
            let names = names();
            for id in failed {
                let name = names.get(&id).cloned().unwrap_or_else(|| id.to_string());
                tracing::warn!(layer = %name, "non-finite preconditioned direction: plain gradient used");
                report.fallbacks.push((name, "non-finite direction".into()));
            }
        }
        report.kl_scale = kl_scale;

        let mut mapper = MomentumUpdate::<B> {
            directions: &mut grads,
            buffers: &mut self.momentum,
            lr,
            momentum: self.config.momentum,
            weight_decay: self.config.weight_decay,
        };
        let module = module.map(&mut mapper);

        report.damping = self.damping;
        report.mode = self.mode;
        self.report = report;
        self.step += 1;
        self.capture.arm(self.is_curvature_step(self.step));
        module
    }

    /// Replaces every preconditioned layer's gradient by its direction; returns the layers whose
    /// direction was not finite (they keep the plain gradient) and the KL-clipping scale.
    fn precondition(
        &mut self,
        lr: LearningRate,
        grads: &mut GradientsParams,
    ) -> (Vec<burn::module::ParamId>, Option<f64>) {
        let mut directions = Vec::new();
        for layer in self.layers.values() {
            let Some(ghat) = layer.meta.gradient::<B::InnerBackend>(grads) else {
                continue;
            };
            let direction = match &layer.curvature {
                Curvature::Empty => None,
                Curvature::LowRank(state) => Some(state.apply(ghat.clone())),
                Curvature::Kfac(state) => state.apply(ghat.clone(), self.damping),
            };
            if let Some(v) = direction {
                let vg = (v.clone() * ghat).sum();
                directions.push((layer.meta.clone(), v, vg));
            }
        }
        if directions.is_empty() {
            return (Vec::new(), None);
        }
        // One host read for every layer: <v, ghat> is NaN exactly when v is not finite.
        let vg = Tensor::cat(directions.iter().map(|d| d.2.clone()).collect(), 0);
        let vg: Vec<f64> = vg
            .into_data()
            .convert::<f64>()
            .to_vec()
            .expect("float tensor");
        let mut failed = Vec::new();
        let mut vg_sum = 0.0;
        for (d, value) in directions.iter().zip(&vg) {
            if value.is_finite() {
                vg_sum += value;
            } else {
                failed.push(d.0.weight_id);
            }
        }
        let kl_scale = self.config.kl_clip.map(|kappa| {
            let denom = lr * lr * vg_sum.abs();
            if denom > 0.0 {
                (kappa / denom).sqrt().min(1.0)
            } else {
                1.0
            }
        });
        for ((meta, v, _), value) in directions.into_iter().zip(vg) {
            if !value.is_finite() {
                continue;
            }
            let v = match kl_scale {
                Some(scale) if scale < 1.0 => v * scale,
                _ => v,
            };
            meta.set_direction(grads, v);
        }
        (failed, kl_scale)
    }
}

/// Names (or ids) of the parameters whose gradients hold NaN or Inf; `None` when all are finite.
fn non_finite_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> Option<Vec<String>> {
    let mut check = FiniteCheck::<B> {
        grads,
        acc: None,
        list: None,
    };
    module.visit(&mut check);
    let total = check.acc?.into_scalar();
    if num_traits_is_finite(total) {
        return None;
    }
    let mut slow = FiniteCheck::<B> {
        grads,
        acc: None,
        list: Some(Vec::new()),
    };
    module.visit(&mut slow);
    let mut names = ParamNames::default();
    module.visit(&mut names);
    Some(
        slow.list
            .unwrap_or_default()
            .into_iter()
            .map(|id| {
                names
                    .names
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| id.to_string())
            })
            .collect(),
    )
}

fn num_traits_is_finite<E: burn::tensor::ElementConversion>(value: E) -> bool {
    value.elem::<f64>().is_finite()
}

impl<M, B> Optimizer<M, B> for NaturalGradient<B>
where
    M: AutodiffModule<B>,
    B: AutodiffBackend,
{
    type Record = NaturalGradientRecord<B>;

    fn step(&mut self, lr: LearningRate, module: M, grads: GradientsParams) -> M {
        self.step_inner(lr, module, grads)
    }

    fn step_multi(&mut self, lr: LearningRate, module: M, mut grads: MultiGradientsParams) -> M {
        let mut merge = MergeGradients {
            multi: &mut grads,
            out: GradientsParams::new(),
        };
        module.visit(&mut merge);
        let merged = merge.out;
        self.step_inner(lr, module, merged)
    }

    fn to_record(&self) -> Self::Record {
        record::to_record(self)
    }

    fn load_record(self, record: Self::Record) -> Self {
        record::load_record(self, record)
    }
}
