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
//!
//! Host round trips: a step that does not refresh curvature reads nothing from the device. The
//! NaN/Inf guard masks the update with a device-side flag, a non-finite direction is replaced by
//! the damped identity on the device, and the KL-clipping scale is computed there too; the
//! [`StepReport`] reads those flags only when asked for. A refresh reads the n x n (SNGD), r x r
//! (HyLo) or d x d (K-FAC) matrices it factorises on the host, and the gradients' NaN flag.
//!
//! A step whose gradients hold NaN or Inf leaves no trace: weights, momentum, the BatchNorm
//! statistics its forward pass updated and (on a curvature step) the curvature stay as they were;
//! the step still counts for the schedules.
//!
//! Fallbacks: a layer whose curvature refresh fails (non-finite kernel or factors, failed
//! factorisation) keeps its last good curvature, or uses the damped identity `g / lambda` when it
//! has none yet; a direction that comes out non-finite is replaced by `g / lambda` for that step.

mod blocks;
mod config;
mod damping;
mod graft;
mod guard;
mod kfac_refresh;
mod layer_grad;
mod lowrank_refresh;
mod record;
mod refresh;
mod report;
mod step_length;
mod visitors;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use burn::module::{AutodiffModule, ParamId};
use burn::optim::{GradientsParams, LearningRate, MultiGradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

pub use config::{CurvatureConfig, HyloConfig, KfacConfig, Method, SngdConfig};
pub use damping::{blew_up, PeriodVerdict, REJECT_GROWTH, REJECT_RAISE};
pub use graft::Graft;
pub use layer_grad::LayerMeta;
pub use record::{NaturalGradientRecord, RECORD_FORMAT};
pub use report::StepReport;
pub use step_length::StepLengthConfig;

use crate::capture::CaptureHandle;
use crate::comm::{Communicator, Single};
use crate::error::{ConfigError, TrainingError};
use crate::host;
use crate::precond::{HyloMode, KfacState, LowRankState};
use guard::GradientProbes;
use report::PendingReport;
use visitors::{MergeGradients, MomentumUpdate, ParamNames};

/// What the optimizer holds for one preconditioned layer.
#[derive(Clone, Debug)]
pub enum Curvature<B: burn::tensor::backend::Backend> {
    /// SNGD, KIS or KID state (or the damped identity when there is no curvature).
    LowRank(LowRankState<B>),
    /// K-FAC factors and eigendecompositions.
    Kfac(KfacState<B>),
}

impl<B: burn::tensor::backend::Backend> Curvature<B> {
    /// The low-rank state, if that is what the layer holds.
    pub fn low_rank(&self) -> Option<&LowRankState<B>> {
        match self {
            Self::LowRank(state) => Some(state),
            Self::Kfac(_) => None,
        }
    }

    /// The K-FAC state, if that is what the layer holds.
    pub fn kfac(&self) -> Option<&KfacState<B>> {
        match self {
            Self::Kfac(state) => Some(state),
            Self::LowRank(_) => None,
        }
    }
}

/// One preconditioned layer: identity, shape and curvature.
#[derive(Clone, Debug)]
pub struct LayerState<B: burn::tensor::backend::Backend> {
    /// Which parameters the layer owns.
    pub meta: LayerMeta,
    /// Its curvature.
    pub curvature: Curvature<B>,
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
    /// The step-length factor on the learning rate (see [`StepLengthConfig`]).
    step_scale: f64,
    last_grad_norm: Option<f64>,
    mode: Option<HyloMode>,
    layers: BTreeMap<u64, LayerState<B::InnerBackend>>,
    /// Weight ids of the preconditioned layers in the model's parameter order: sums over the
    /// layers run in this order, the same in every run and on every rank (ids are random).
    order: Vec<u64>,
    /// The layers grouped for a step (built for `order`; `None` once the curvature changed).
    blocks: Option<blocks::Blocks<B::InnerBackend>>,
    momentum: BTreeMap<u64, Tensor<B::InnerBackend, 1>>,
    /// Floats without a gradient (BatchNorm statistics) after the last step, to undo a skipped
    /// step's forward-pass updates.
    stateful: BTreeMap<u64, Tensor<B::InnerBackend, 1>>,
    report: PendingReport<B::InnerBackend>,
    /// `[skipped steps, consecutive skipped steps]` on the device.
    skips: Option<Tensor<B::InnerBackend, 1>>,
    names: Arc<HashMap<ParamId, String>>,
    comm: Arc<dyn Communicator>,
    observer: Option<ReportObserver>,
    /// Adaptive damping: the period under way.
    period: Option<damping::Period<B::InnerBackend>>,
    /// Adaptive damping: `[loss before, loss after, predicted change]` of the period that ends
    /// at the next step, read there.
    loss_change: Option<Tensor<B::InnerBackend, 1>>,
    /// The next step refreshes (and inverts) the curvature whatever the schedule: it follows a
    /// rejected period.
    force_refresh: bool,
    /// Periods rejected so far (adaptive damping).
    rejected_periods: usize,
    /// Periods rejected in a row.
    consecutive_rejections: usize,
    /// Adaptive damping: the loss of the first judged period's batch at its start (the
    /// reference of a slow blow-up).
    first_loss: Option<f64>,
    /// Adaptive damping: a period ended without its loss change (warned once).
    unobserved_warned: bool,
    /// Set when too many periods in a row were rejected: the optimizer no longer changes the
    /// weights.
    failure: Option<TrainingError>,
}

/// What [`NaturalGradient::try_step`] returns once the optimizer has given up: the module (the
/// weights of the last period that was kept) and why.
#[derive(Debug)]
pub struct GaveUp<M> {
    /// The module, unchanged by the step.
    pub module: M,
    /// Why training stopped.
    pub error: TrainingError,
}

/// Called with every step's report (see [`NaturalGradient::with_report_observer`]).
pub type ReportObserver = Arc<dyn Fn(&StepReport) + Send + Sync>;

impl<B: AutodiffBackend> NaturalGradient<B> {
    /// An optimizer running `method`; prefer the `*Config::init` constructors.
    pub fn new(
        method: Method,
        config: CurvatureConfig,
        capture: &CaptureHandle,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let damping = config.damping.initial;
        let step_scale = config.step_length.initial;
        let optim = Self {
            method,
            config,
            capture: capture.clone(),
            step: 0,
            refreshes: 0,
            damping,
            step_scale,
            last_grad_norm: None,
            mode: None,
            layers: BTreeMap::new(),
            order: Vec::new(),
            blocks: None,
            momentum: BTreeMap::new(),
            stateful: BTreeMap::new(),
            report: PendingReport::known(StepReport::default()),
            skips: None,
            names: Arc::default(),
            comm: Arc::new(Single),
            observer: None,
            period: None,
            loss_change: None,
            force_refresh: false,
            rejected_periods: 0,
            consecutive_rejections: 0,
            first_loss: None,
            unobserved_warned: false,
            failure: None,
        };
        optim.capture.arm(optim.is_curvature_step(0));
        optim.request_period();
        Ok(optim)
    }

    /// Runs the optimizer's curvature work across the workers of `comm` (data parallel: every
    /// worker passes its own batch shard and the all-reduced mean gradient to `step`).
    pub fn with_communicator(mut self, comm: Arc<dyn Communicator>) -> Self {
        self.comm = comm;
        self
    }

    /// Calls `observer` with the report of every step: for training loops that do not hold the
    /// optimizer, such as burn-train's `Learner`. Each call resolves the report, which costs one
    /// blocking device read per step.
    pub fn with_report_observer(mut self, observer: ReportObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The communicator (`Single` unless distributed).
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// The method this optimizer runs.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// Steps taken so far (skipped steps included).
    pub fn steps(&self) -> usize {
        self.step
    }

    /// The damping lambda in force.
    pub fn damping(&self) -> f64 {
        self.damping
    }

    /// The factor on the learning rate that the step-length trust region has set (1 unless
    /// adaptive damping judged a period a bad one).
    pub fn step_scale(&self) -> f64 {
        self.step_scale
    }

    /// HyLo's mode at the last refresh (`None` for SNGD and K-FAC, or before the first).
    pub fn mode(&self) -> Option<HyloMode> {
        self.mode
    }

    /// What happened in the last step (the first call after a step reads the step's device-side
    /// flags: one blocking read).
    pub fn last_report(&self) -> &StepReport {
        self.report.resolve()
    }

    /// The parts of the last step's report known without reading the device: whether it
    /// refreshed the curvature, the bytes moved, the damping, the mode and the period verdict
    /// (`skipped`, `fallbacks`, `non_finite` and `kl_scale` are left at their defaults: they
    /// need [`NaturalGradient::last_report`]).
    pub fn last_known(&self) -> &StepReport {
        &self.report.known
    }

    /// Periods rejected in a row by adaptive damping up to the last step (reset by a period
    /// that is judged and kept).
    pub fn consecutive_rejections(&self) -> usize {
        self.consecutive_rejections
    }

    /// `(skipped steps, consecutive skipped steps up to the last one)`; one blocking read.
    pub fn skipped_steps(&self) -> (u64, u64) {
        match &self.skips {
            None => (0, 0),
            Some(counts) => {
                let v = host::read_f64(counts.clone());
                (v[0] as u64, v[1] as u64)
            }
        }
    }

    /// The preconditioned layers, by weight id.
    pub fn layers(&self) -> impl Iterator<Item = &LayerState<B::InnerBackend>> {
        self.layers.values()
    }

    /// The preconditioned layers in the model's parameter order.
    fn ordered_layers(&self) -> impl Iterator<Item = &LayerState<B::InnerBackend>> {
        self.order.iter().filter_map(|id| self.layers.get(id))
    }

    /// Whether step `step` captures curvature: every `freq` steps, and the step after a
    /// rejected period.
    pub fn is_curvature_step(&self, step: usize) -> bool {
        step.is_multiple_of(self.config.freq) || (self.force_refresh && step == self.step)
    }

    /// Periods rejected by adaptive damping so far (their loss blew up; see
    /// [`PeriodVerdict::Rejected`]).
    pub fn rejected_periods(&self) -> usize {
        self.rejected_periods
    }

    /// Why the optimizer stopped training, if it did: after `max_rejections` rejected periods
    /// in a row every further step leaves the module as it is (the weights of the last period
    /// that was kept).
    pub fn failure(&self) -> Option<&TrainingError> {
        self.failure.as_ref()
    }

    /// [`Optimizer::step`] that says when the optimizer has given up (see
    /// [`NaturalGradient::failure`]): from the step that gives up on, the module comes back in
    /// the error, with the weights of the last period that was kept.
    pub fn try_step<M: AutodiffModule<B>>(
        &mut self,
        lr: LearningRate,
        module: M,
        grads: GradientsParams,
    ) -> Result<M, GaveUp<M>> {
        let module = self.step_inner(lr, module, grads);
        match &self.failure {
            Some(error) => Err(GaveUp {
                module,
                error: error.clone(),
            }),
            None => Ok(module),
        }
    }

    fn name_of(&self, id: &ParamId) -> String {
        self.names
            .get(id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    fn step_inner<M: AutodiffModule<B>>(
        &mut self,
        lr: LearningRate,
        module: M,
        mut grads: GradientsParams,
    ) -> M {
        let captures = self.capture.take::<B::InnerBackend>();
        if self.failure.is_some() {
            // Gave up: nothing changes any more (the period machinery included).
            self.capture.arm(false);
            self.capture.request_period(false, false);
            self.report = PendingReport::known(StepReport {
                step: self.step,
                skipped: true,
                damping: self.damping,
                step_scale: self.step_scale,
                mode: self.mode,
                ..StepReport::default()
            });
            self.step += 1;
            return module;
        }
        let mut probes = GradientProbes::<B>::new(&grads);
        module.visit(&mut probes);
        let GradientProbes { ids, probes, .. } = probes;
        if ids.iter().any(|id| !self.names.contains_key(id)) {
            let mut visitor = ParamNames::default();
            module.visit(&mut visitor);
            self.names = Arc::new(visitor.names);
        }
        let apply = guard::all_finite(&probes);

        let mut known = StepReport {
            step: self.step,
            ..StepReport::default()
        };
        // Adaptive damping: the period that ends here sets the damping this step's inversion
        // uses, or is rejected (its loss blew up): then the weights and momentum go back to its
        // start, and this step, computed at the blown-up weights, changes nothing else.
        // Adaptive damping: the losses the training loop handed over through the capture handle
        // (`CaptureHandle::gradients_with_loss`): the loss of a period's first batch now, and of
        // the batch that starts the next one.
        let (started, ended) = self.capture.take_period_losses::<B::InnerBackend>();
        if let (Some(after), Some(before)) =
            (ended, self.period.as_ref().and_then(|p| p.before.clone()))
        {
            self.observe_loss_change(&module, before, after);
        }
        known.period = self.end_period();
        if let Some(PeriodVerdict::Adapted { .. }) = known.period {
            self.consecutive_rejections = 0;
        }
        if let Some(PeriodVerdict::Rejected { before, after }) = known.period {
            self.rejected_periods += 1;
            self.consecutive_rejections += 1;
            if self.consecutive_rejections >= self.config.max_rejections {
                let failure = TrainingError::Diverged {
                    rejections: self.consecutive_rejections,
                    before,
                    after,
                    damping: self.damping,
                    step_scale: self.step_scale,
                };
                tracing::error!("{failure}");
                self.failure = Some(failure);
            }
            let module = self.restore_period(module);
            known.damping = self.damping;
            known.step_scale = self.step_scale;
            known.mode = self.mode;
            self.report = PendingReport::known(known);
            if let Some(observer) = &self.observer {
                observer(self.report.resolve());
            }
            self.step += 1;
            self.capture.arm(true);
            self.request_period();
            return module;
        }
        let inversion = self.is_inversion_step(self.step);
        self.force_refresh = false;
        // A refresh reads its matrices from the device anyway: it also reads the gradient flag,
        // and does not refresh from a batch whose gradients hold NaN or Inf (the step is skipped
        // and leaves no trace, in the curvature either).
        let poisoned = !captures.is_empty()
            && apply
                .as_ref()
                .is_some_and(|ok| host::read_scalar(ok.clone().float()) == 0.0);
        if poisoned {
            tracing::warn!(
                step = self.step,
                "NaN or Inf in the gradients: curvature refresh and update skipped"
            );
        } else if !captures.is_empty() {
            known.refreshed = true;
            let (failures, bytes) = self.refresh(captures, &grads, inversion);
            known.comm = bytes;
            for (id, reason) in failures {
                let name = self.name_of(&id);
                tracing::warn!(layer = %name, %reason, "curvature refresh failed: last good curvature kept");
                known.fallbacks.push((name, reason));
            }
        } else if self.is_curvature_step(self.step) {
            tracing::warn!(
                step = self.step,
                "curvature step without captured layers: was the forward pass run with the \
                 capture wrappers, and the gradients routed through CaptureHandle::gradients?"
            );
        }

        self.order = ids
            .iter()
            .map(|id| id.val())
            .filter(|id| self.layers.contains_key(id))
            .collect();
        if self.blocks.as_ref().is_none_or(|b| b.order != self.order) {
            self.blocks = Some(blocks::Blocks::build(&self.order, &mut self.layers));
        }
        // Burn's RunningState (BatchNorm statistics) keeps the forward pass's update pending until
        // it is synchronised: a record synchronises it, so the visitors and the mapper below see
        // the updated value.
        let _ = module.clone().into_record();
        // Adaptive damping: an inversion starts a period (every float of the model and the
        // gradients before the update).
        if known.refreshed && inversion && self.config.damping.adaptive {
            self.start_period(&module, &grads, started);
        }
        let Preconditioned {
            layers,
            inner_products,
            kl_scale,
        } = self.precondition(lr, &mut grads);

        let mut mapper = MomentumUpdate::<B> {
            directions: &mut grads,
            buffers: &mut self.momentum,
            stateful: &mut self.stateful,
            lr: lr * self.step_scale,
            momentum: self.config.momentum,
            weight_decay: self.config.weight_decay,
            apply: apply.clone(),
        };
        let module = module.map(&mut mapper);
        if let Some(apply) = &apply {
            self.skips = Some(guard::count_skips(self.skips.take(), apply));
        }

        known.damping = self.damping;
        known.step_scale = self.step_scale;
        known.mode = self.mode;
        let mut values: Vec<Tensor<B::InnerBackend, 1>> = probes;
        values.extend(inner_products);
        values.extend(kl_scale.iter().cloned());
        self.report = PendingReport {
            known,
            names: self.names.clone(),
            params: ids,
            layers,
            kl: kl_scale.is_some(),
            values,
            resolved: Default::default(),
        };
        if let Some(observer) = &self.observer {
            observer(self.report.resolve());
        }
        self.step += 1;
        self.capture.arm(self.is_curvature_step(self.step));
        self.request_period();
        module
    }

    /// Tells the training loop, through the capture handle, whether the next step starts or
    /// ends a curvature period (adaptive damping).
    fn request_period(&self) {
        let adaptive = self.config.damping.adaptive;
        let inversion = self.is_inversion_step(self.step);
        self.capture.request_period(
            adaptive && inversion,
            adaptive && inversion && self.period.is_some(),
        );
    }

    /// One layer's gradient and direction, as a block of one (`None` without its gradient).
    fn precondition_layer<'a>(
        &self,
        layer: &'a LayerState<B::InnerBackend>,
        grads: &GradientsParams,
    ) -> Option<Part<'a, B::InnerBackend>> {
        let ghat = layer.meta.gradient::<B::InnerBackend>(grads)?;
        let v = match &layer.curvature {
            Curvature::LowRank(state) => state.apply(ghat.clone()),
            Curvature::Kfac(state) => state.apply(ghat.clone(), self.damping),
        };
        Some((vec![&layer.meta], ghat.unsqueeze_dim(0), v.unsqueeze_dim(0)))
    }

    /// Replaces every preconditioned layer's gradient by its direction, on the device: the
    /// layers of a block together (see [`blocks`]).
    fn precondition(
        &self,
        lr: LearningRate,
        grads: &mut GradientsParams,
    ) -> Preconditioned<B::InnerBackend> {
        type Inner<B> = <B as AutodiffBackend>::InnerBackend;
        // (layers, gradients [L, d_out, d_in'], directions [L, d_out, d_in']) per block.
        let mut parts: Vec<Part<Inner<B>>> = Vec::new();
        let single = |layer, grads: &GradientsParams| self.precondition_layer(layer, grads);
        for block in self.blocks.iter().flat_map(|b| &b.blocks) {
            let layers: Vec<_> = block
                .ids
                .iter()
                .filter_map(|id| self.layers.get(id))
                .collect();
            let metas: Vec<_> = layers.iter().map(|l| &l.meta).collect();
            match blocks::gather::<Inner<B>>(&metas, grads) {
                Some(ghat) if metas.len() == block.ids.len() => {
                    let v = block.stack.apply(ghat.clone(), self.damping);
                    parts.push((metas, ghat, v));
                }
                // A layer without its gradient: the others on their own.
                _ => parts.extend(layers.into_iter().filter_map(|l| single(l, grads))),
            }
        }
        if parts.is_empty() {
            return Preconditioned {
                layers: Vec::new(),
                inner_products: Vec::new(),
                kl_scale: None,
            };
        }
        let mut directions = Vec::with_capacity(parts.len());
        for (metas, ghat, v) in parts {
            // The block's three reductions first (`<v, g>`, `|g|^2`, `|v|^2`), then each
            // layer's factors, then the entries: fewer kernels than a layer at a time, though on
            // lavapipe (no autotune) each `[L, 1, 1]` operation still runs as its own kernel.
            let vg = blocks::per_layer_sum(v.clone() * ghat.clone());
            let squares = (self.config.graft != Graft::None).then(|| {
                let squared =
                    |t: &Tensor<Inner<B>, 3>| blocks::per_layer_sum(t.clone().powi_scalar(2));
                (squared(&ghat), squared(&v))
            });
            let ok = guard::finite(vg.clone());
            let scale = squares.and_then(|(gg, vv)| self.config.graft.scale(gg, vv));
            let (v, identity) = match scale {
                // Grafted, the damped identity g / lambda is g itself.
                Some(scale) => (v * scale, ghat.clone()),
                None => (v, ghat.clone() / self.damping),
            };
            let v = guard::choose_shaped(&ok, v, identity);
            // <v, g> of the direction applied, for the KL clip.
            let applied_vg = self
                .config
                .kl_clip
                .map(|_| blocks::per_layer_sum(v.clone() * ghat.clone()).reshape([metas.len()]));
            let vg = vg.reshape([metas.len()]);
            directions.push((metas, v, vg, applied_vg));
        }
        let kl_scale = self.config.kl_clip.map(|kappa| {
            let total = Tensor::cat(directions.iter().filter_map(|d| d.3.clone()).collect(), 0)
                .sum_dim(0)
                .abs();
            // min(1, sqrt(kappa / (lr^2 sum <v, g>))); a zero sum gives +inf, clamped to 1.
            (total.recip() * (kappa / (lr * lr))).sqrt().clamp_max(1.0)
        });
        let inner = directions.iter().map(|d| d.2.clone()).collect();
        let mut layers = Vec::with_capacity(directions.len());
        for (metas, v, _, _) in directions {
            let v = match &kl_scale {
                Some(scale) => v * scale.clone().reshape([1, 1, 1]),
                None => v,
            };
            layers.extend(metas.iter().map(|meta| meta.weight_id));
            blocks::scatter(&metas, grads, v);
        }
        Preconditioned {
            layers,
            inner_products: inner,
            kl_scale,
        }
    }
}

/// Layers preconditioned together: their gradients and directions `[L, d_out, d_in']`.
type Part<'a, B> = (Vec<&'a LayerMeta>, Tensor<B, 3>, Tensor<B, 3>);

/// What [`NaturalGradient::precondition`] left on the device for the step report.
struct Preconditioned<B: burn::tensor::backend::Backend> {
    /// The preconditioned layers (weight ids).
    layers: Vec<ParamId>,
    /// `<v, g>` per layer (`[L]` per block, in the order of `layers`), NaN where the direction
    /// was not finite and the damped identity was used instead.
    inner_products: Vec<Tensor<B, 1>>,
    /// The KL-clipping scale (`[1]`).
    kl_scale: Option<Tensor<B, 1>>,
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
