//! Adaptive damping: the Levenberg-Marquardt rule on the reduction ratio of each curvature
//! period (Martens & Grosse 2015, section 6.5; kfac-jax).
//!
//! A period runs from one inversion step `s` (SNGD and HyLo: every refresh; K-FAC: every
//! `inverse_every` steps) to the next, `s + T`; over it the weights move by
//! `Delta = theta_{s+T} - theta_s` (directions, momentum, weight decay, grafting and KL clipping
//! included). The local quadratic model built at `s` predicts the change of the loss of the batch
//! `B_s` of step `s`:
//!
//! `q(Delta) = sum_params <g_s, Delta> + sum_layers Delta^T F_s Delta / 2`
//!
//! over the parameters of the preconditioned layers, each with its Fisher exactly as its
//! preconditioner inverts it (the kept rows with their weights for SNGD, KIS and KID,
//! `G kron A` for K-FAC), damping excluded. Parameters without curvature (BatchNorm's scale and
//! shift) are left out of both terms: a linear term without its quadratic term predicts a
//! decrease that grows without bound with the step. Right before step
//! `s + T` the training loop evaluates the loss of `B_s` at the current weights and hands it, with
//! the loss it had at step `s`, to [`NaturalGradient::observe_loss_change`]. Step `s + T` then
//! reads `[L_before, L_after, q, quadratic term]` (one read of four numbers) and:
//!
//! - rejects the period when the loss grew by [`REJECT_GROWTH`] times or more, gave back half of
//!   the progress since the first period, or is not finite:
//!   every float of the model and the momentum go back to their values at `s`, the damping is
//!   raised by [`REJECT_RAISE`], the step's update and refresh are skipped and the next step
//!   refreshes the curvature at the restored weights (a blow-up is not trained on);
//! - leaves lambda alone when `q >= -epsilon` (the model predicts no decrease: its ratio says
//!   nothing about the direction);
//! - otherwise applies [`levenberg_marquardt`] with `omega^T`, except that lambda is lowered
//!   only when the period's quadratic term was a real part of `q`
//!   ([`curvature_was_tested`]; with grafting a step of SGD's length often tests the linear
//!   term only);
//! - and in both cases lets the step-length trust region ([`super::StepLengthConfig`]) shorten
//!   the step (a predicted increase, a rise, `rho < 1/4`) or lengthen it (`rho > 3/4`): with
//!   grafting the damping alone cannot change how long a step is. A rejection shortens it too.
//!
//! Measuring over the whole period rather than one step matters with momentum and `T > 1`: a
//! damping too small shows up as momentum-driven steps that leave the model's region over the
//! following steps, while the inversion step alone still looks fine. No step between inversions
//! reads anything.

use std::collections::{BTreeMap, BTreeSet};

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use super::{Curvature, NaturalGradient};
use crate::host;
use crate::schedule::{curvature_was_tested, levenberg_marquardt};

/// A period whose loss on its first batch grew by this factor over the period (losses below
/// 1/20 of the first period's count as that: tiny losses fluctuate by large factors), or became
/// non-finite, is rejected: the weights go back to the period's start. Measured: the loss of a
/// batch the period trained on doubles only when the step blew up (K-FAC's first period on the
/// MNIST small CNN went from 2.3 to 19.8 and left the network dead at chance; a tenfold rule
/// let it through).
pub const REJECT_GROWTH: f64 = 2.0;

/// A period that undoes this fraction of the progress made since the first period (and at
/// least `REGRESSION_FLOOR` of the first period's loss) is a blow-up: the test that works for
/// bounded losses (Dice in `[0, 1)`), where a large factor is impossible.
pub const REJECT_REGRESSION: f64 = 0.5;

/// The smallest rise, relative to the first period's loss, that `REJECT_REGRESSION` counts.
pub const REGRESSION_FLOOR: f64 = 0.1;

/// Whether a period's loss change is a blow-up: `after` not finite, `REJECT_GROWTH` times
/// `before` (or 1/20 of `first`, the first period's loss, when `before` is smaller), or a rise
/// that gives back `REJECT_REGRESSION` of the progress from `first` down to `before` in one
/// period.
pub fn blew_up(before: f64, after: f64, first: f64) -> bool {
    let base = before.abs().max(first.abs() / 20.0);
    if !after.is_finite() || after > REJECT_GROWTH * base {
        return true;
    }
    let progress = first - before;
    let rise = after - before;
    progress > 0.0 && rise >= REJECT_REGRESSION * progress && rise > REGRESSION_FLOOR * first.abs()
}

/// Factor by which a rejected period raises the damping.
pub const REJECT_RAISE: f64 = 10.0;

/// What adaptive damping keeps from an inversion step until the end of its period, by
/// parameter id, flattened: every float of the model (parameters and BatchNorm statistics) at
/// the start of the period, the momentum buffers then, and the step's gradients.
#[derive(Clone)]
pub(super) struct Period<I: Backend> {
    /// Every float of the model at the start of the period.
    pub params: BTreeMap<u64, Tensor<I, 1>>,
    /// The momentum buffers at the start of the period.
    pub momentum: BTreeMap<u64, Tensor<I, 1>>,
    /// The gradients of the inversion step.
    pub gradients: BTreeMap<u64, Tensor<I, 1>>,
    /// The loss of the inversion step's batch, when the training loop handed it over
    /// (`CaptureHandle::gradients_with_loss`).
    pub before: Option<Tensor<I, 1>>,
}

/// How the period that ends at this step was judged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PeriodVerdict {
    /// The damping was adapted (or left alone) from the reduction ratio.
    Adapted {
        /// Loss of the refresh batch at the period's start.
        before: f64,
        /// Loss of the same batch at its end.
        after: f64,
        /// The change the quadratic model predicted.
        predicted: f64,
    },
    /// The loss blew up: weights and momentum were restored to the period's start and the
    /// update of this step skipped.
    Rejected {
        /// Loss of the refresh batch at the period's start.
        before: f64,
        /// Loss of the same batch at its end.
        after: f64,
    },
}

/// Every float of a module and its gradient in `grads`, flattened, by parameter id.
struct Floats<'a, I: Backend> {
    grads: &'a GradientsParams,
    values: BTreeMap<u64, Tensor<I, 1>>,
    gradients: BTreeMap<u64, Tensor<I, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Floats<'_, B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val().inner();
        let numel = value.shape().num_elements();
        self.values.insert(param.id.val(), value.reshape([numel]));
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            self.gradients.insert(param.id.val(), g.reshape([numel]));
        }
    }
}

/// `q(Delta)`'s parts from the module at the end of a period: the linear term over the
/// parameters of the preconditioned layers (`modelled`; the others, such as BatchNorm's, have no
/// curvature in the model, so they are left out of both terms), and the steps `Delta` (in the
/// parameters' own shapes) for the quadratic term.
struct PeriodEnd<'a, I: Backend> {
    period: &'a Period<I>,
    modelled: &'a BTreeSet<u64>,
    linear: Vec<Tensor<I, 1>>,
    deltas: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for PeriodEnd<'_, B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let id = param.id.val();
        if !self.modelled.contains(&id) {
            return;
        }
        let (Some(start), Some(gradient)) =
            (self.period.params.get(&id), self.period.gradients.get(&id))
        else {
            return;
        };
        let now = param.val().inner();
        let dims = now.dims();
        let delta = now.reshape([start.dims()[0]]) - start.clone();
        self.linear.push((gradient.clone() * delta.clone()).sum());
        self.deltas
            .register::<B::InnerBackend, D>(param.id, delta.reshape(dims));
    }
}

/// Puts every float of a module back to its value in `values` (a rejected period).
struct Restore<'a, I: Backend> {
    values: &'a BTreeMap<u64, Tensor<I, 1>>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Restore<'_, B::InnerBackend> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(saved) = self.values.get(&id.val()) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let mut restored = Tensor::from_inner(saved.clone().reshape(tensor.dims()));
        if require_grad {
            restored = restored.require_grad();
        }
        Param::from_mapped_value(id, restored, mapper)
    }
}

/// `delta^T F delta` of one layer's curvature for a step `delta` `[d_out, d_in']` (damping
/// excluded), as the layer's preconditioner sees it.
fn quadratic<B: Backend>(curvature: &Curvature<B>, delta: Tensor<B, 2>) -> Tensor<B, 1> {
    match curvature {
        Curvature::LowRank(state) => state.quadratic(delta),
        // (G kron A) vec(delta) = vec(G delta A) (both factors symmetric).
        Curvature::Kfac(state) => {
            let product = state
                .g_factor
                .clone()
                .matmul(delta.clone())
                .matmul(state.a_factor.clone());
            (product * delta).sum()
        }
    }
}

impl<B: AutodiffBackend> NaturalGradient<B> {
    /// Whether the damping adapts to the reduction ratio.
    pub fn adapts_damping(&self) -> bool {
        self.config.damping.adaptive
    }

    /// Adaptive damping: whether the next step ends a period that awaits its loss change. The
    /// training loop then evaluates the batch of the period's first step at the current weights
    /// and calls [`NaturalGradient::observe_loss_change`] before that step.
    pub fn wants_loss_change(&self) -> bool {
        self.period.is_some() && self.loss_change.is_none() && self.is_inversion_step(self.step)
    }

    /// Reports the loss of the period's first batch at that step (`before`: the loss the step
    /// was computed from) and at the current weights of `model` (`after`: the same batch,
    /// curvature capture off, BatchNorm statistics untouched), for adaptive damping; ignored
    /// unless [`NaturalGradient::wants_loss_change`]. Pass detached values; nothing is read from
    /// the device here (the next step reads the four numbers it decides on).
    pub fn observe_loss_change<M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        before: Tensor<B::InnerBackend, 1>,
        after: Tensor<B::InnerBackend, 1>,
    ) {
        if !self.wants_loss_change() {
            return;
        }
        let Some(period) = &self.period else {
            return;
        };
        let modelled: BTreeSet<u64> = self
            .ordered_layers()
            .flat_map(|l| std::iter::once(l.meta.weight_id).chain(l.meta.bias_id))
            .map(|id| id.val())
            .collect();
        let mut end = PeriodEnd {
            period,
            modelled: &modelled,
            linear: Vec::new(),
            deltas: GradientsParams::new(),
        };
        model.visit(&mut end);
        let PeriodEnd { linear, deltas, .. } = end;
        let mut quadratics = Vec::new();
        for layer in self.ordered_layers() {
            if let Some(delta) = layer.meta.gradient::<B::InnerBackend>(&deltas) {
                quadratics.push(quadratic(&layer.curvature, delta) / 2.0);
            }
        }
        let device = before.device();
        // Summed in the model's parameter order (a fixed order: reproducible, and the same on
        // every rank).
        let sum = |terms: Vec<Tensor<B::InnerBackend, 1>>| {
            if terms.is_empty() {
                Tensor::zeros([1], &device)
            } else {
                Tensor::cat(terms, 0).sum_dim(0)
            }
        };
        let quadratic = sum(quadratics);
        let predicted = sum(linear) + quadratic.clone();
        self.loss_change = Some(Tensor::cat(
            vec![
                before.reshape([1]),
                after.reshape([1]),
                predicted,
                quadratic,
            ],
            0,
        ));
    }

    /// Whether step `step` inverts the curvature (the damping is set there): every refresh for
    /// SNGD and HyLo, every `inverse_every` steps for K-FAC, and the step after a rejected period.
    pub fn is_inversion_step(&self, step: usize) -> bool {
        let every = match &self.method {
            super::Method::Kfac { inverse_every, .. } => *inverse_every,
            _ => self.config.freq,
        };
        step.is_multiple_of(every) || (self.force_refresh && step == self.step)
    }

    /// Judges the period that ends at this step, if its loss change was observed (one read of
    /// four numbers, averaged over the workers so that they all decide alike): adapts the
    /// damping, or rejects the period. The period ends here either way.
    pub(super) fn end_period(&mut self) -> Option<PeriodVerdict> {
        let change = self.loss_change.take()?;
        let mut values: Vec<f32> = host::read_f32(change);
        self.comm.all_reduce_sum(&mut values);
        let workers = self.comm.size() as f64;
        let [before, after, predicted] = [0, 1, 2].map(|i| f64::from(values[i]) / workers);
        // A record saved mid-period by an earlier version holds three numbers.
        let quadratic = values.get(3).map_or(f64::NAN, |&q| f64::from(q) / workers);
        let first = *self.first_loss.get_or_insert(before);
        if blew_up(before, after, first) {
            self.damping = (self.damping * REJECT_RAISE).min(self.config.damping.max);
            self.step_scale = self.config.step_length.rejected(self.step_scale);
            tracing::warn!(
                before,
                after,
                first,
                damping = self.damping,
                "adaptive damping: the loss of the refresh batch blew up over the period; weights \
                 restored to its start and the damping raised"
            );
            return Some(PeriodVerdict::Rejected { before, after });
        }
        let config = &self.config.damping;
        self.period = None;
        // Martens & Grosse's omega = (19/20)^T1 for an adjustment every T1 steps.
        let steps = match &self.method {
            super::Method::Kfac { inverse_every, .. } => *inverse_every,
            _ => self.config.freq,
        };
        let omega = config.omega.powi(steps as i32);
        let adapted = levenberg_marquardt(
            self.damping,
            after - before,
            predicted,
            before,
            omega,
            config.min,
            config.max,
        );
        // Lowered only on the evidence of a step the curvature shaped.
        if adapted >= self.damping
            || curvature_was_tested(predicted, quadratic, config.min_curvature_share)
        {
            self.damping = adapted;
        }
        self.step_scale =
            self.config
                .step_length
                .adapt(self.step_scale, after - before, predicted, before);
        tracing::debug!(
            before,
            after,
            predicted,
            quadratic,
            damping = self.damping,
            step_scale = self.step_scale,
            "adaptive damping"
        );
        Some(PeriodVerdict::Adapted {
            before,
            after,
            predicted,
        })
    }

    /// Undoes the period that was just rejected: every float of `module` and the momentum go
    /// back to the period's start; the next step refreshes the curvature.
    pub(super) fn restore_period<M: AutodiffModule<B>>(&mut self, module: M) -> M {
        let Some(period) = self.period.take() else {
            return module;
        };
        self.momentum = period.momentum;
        self.stateful.clear();
        self.force_refresh = true;
        module.map(&mut Restore {
            values: &period.params,
        })
    }

    /// Starts a period at an inversion step: every float of `module` (before the update), the
    /// momentum buffers and the gradients in `grads` (before preconditioning).
    pub(super) fn start_period<M: AutodiffModule<B>>(
        &mut self,
        module: &M,
        grads: &GradientsParams,
        before: Option<Tensor<B::InnerBackend, 1>>,
    ) {
        if self.period.is_some() && !self.unobserved_warned {
            self.unobserved_warned = true;
            tracing::warn!(
                damping = self.damping,
                "adaptive damping: no loss change was reported for the last period, so the \
                 damping stays where it is; report it with NaturalGradient::observe_loss_change \
                 before each inversion step"
            );
        }
        let mut floats = Floats {
            grads,
            values: BTreeMap::new(),
            gradients: BTreeMap::new(),
        };
        module.visit(&mut floats);
        self.period = Some(Period {
            params: floats.values,
            momentum: self.momentum.clone(),
            gradients: floats.gradients,
            before,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blow_up_is_a_doubled_loss_a_non_finite_one_or_half_the_progress_given_back() {
        // Cross-entropy from 2.3: K-FAC's first period on the MNIST CNN went to 19.8.
        assert!(blew_up(2.3, 19.8, 2.3));
        assert!(blew_up(2.3, 4.7, 2.3));
        assert!(!blew_up(2.3, 4.5, 2.3));
        assert!(blew_up(0.5, f64::NAN, 2.3));
        assert!(blew_up(0.5, f64::INFINITY, 2.3));
        // Tiny losses fluctuate by large factors: below 1/20 of the first, that is the base.
        assert!(!blew_up(0.01, 0.2, 2.3));
        assert!(blew_up(0.01, 0.24, 2.3));
        // A bounded loss (Dice from 0.9) cannot double: giving back half of the progress since
        // the first period is the blow-up, beyond a tenth of the first loss.
        assert!(blew_up(0.3, 0.65, 0.9));
        assert!(!blew_up(0.3, 0.55, 0.9));
        assert!(!blew_up(0.88, 0.95, 0.9));
    }
}
