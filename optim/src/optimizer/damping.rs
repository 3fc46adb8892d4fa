//! Adaptive damping: the Levenberg-Marquardt rule on the reduction ratio of each refresh
//! period.
//!
//! A curvature refreshed at step `s` is used until the next refresh at `s + freq`; over that
//! period the weights move by `Delta = theta_{s+freq} - theta_s` (directions, momentum, weight
//! decay and KL clipping included). The local quadratic model built at `s` predicts the change
//! of the loss of the refresh batch `B_s`:
//! `q(Delta) = sum_layers <g_s, Delta> + Delta^T F_s Delta / 2`, with each layer's curvature
//! (the kept per-sample rows for SNGD and HyLo, the factors for K-FAC). Right before the next
//! refresh the training loop evaluates the loss of `B_s` at the current weights and hands it,
//! with the loss of `B_s` at step `s`, to [`NaturalGradient::observe_loss_change`]; the ratio
//! `rho = (L(B_s, theta_{s+freq}) - L(B_s, theta_s)) / q(Delta)` then drives
//! [`levenberg_marquardt`](crate::schedule::levenberg_marquardt) at that refresh.
//!
//! Measuring over the whole period rather than the refresh step alone (Martens & Grosse's
//! one-step ratio) matters with momentum and `freq > 1`: a damping too small shows up as
//! momentum-driven steps that leave the quadratic model's region over the following steps, while
//! the refresh step alone still looks fine. The ratio is read at the refresh (one scalar); no
//! step between refreshes reads anything.

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use super::{Curvature, NaturalGradient};
use crate::host;
use crate::schedule::levenberg_marquardt;

/// The weights and biases of the preconditioned layers, by parameter id.
struct LayerParams<'a, I: Backend> {
    ids: &'a [ParamId],
    values: GradientsParams,
    _backend: std::marker::PhantomData<I>,
}

impl<'a, I: Backend> LayerParams<'a, I> {
    fn new(ids: &'a [ParamId]) -> Self {
        Self {
            ids,
            values: GradientsParams::new(),
            _backend: std::marker::PhantomData,
        }
    }
}

impl<B: AutodiffBackend> ModuleVisitor<B> for LayerParams<'_, B::InnerBackend> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.ids.contains(&param.id) {
            self.values
                .register::<B::InnerBackend, D>(param.id, param.val().inner());
        }
    }
}

/// `delta^T F delta` of one layer's curvature for a step `delta` `[d_out, d_in']`.
fn quadratic<B: Backend>(curvature: &Curvature<B>, delta: Tensor<B, 2>) -> Tensor<B, 1> {
    match curvature {
        Curvature::LowRank(state) => match &state.rows {
            // F = (1/n) J^T J over the kept rows.
            Some(rows) => rows.apply(delta).powi_scalar(2).sum() / rows.len().max(1) as f64,
            None => Tensor::zeros([1], &delta.device()),
        },
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

/// What adaptive damping keeps from a refresh step until the end of its period: for each
/// preconditioned layer (by weight id), its parameters before the refresh step's update and its
/// gradient at that step, both as `[d_out, d_in']` matrices.
#[derive(Clone)]
pub(super) struct Period<I: Backend> {
    /// Parameters at the start of the period.
    pub start: Vec<(u64, Tensor<I, 2>)>,
    /// Gradients of the refresh step.
    pub gradients: Vec<(u64, Tensor<I, 2>)>,
}

impl<B: AutodiffBackend> NaturalGradient<B> {
    /// Whether the damping adapts to the reduction ratio.
    pub fn adapts_damping(&self) -> bool {
        self.config.damping.adaptive
    }

    /// Adaptive damping: whether the next step refreshes and the period since the last refresh
    /// awaits its loss change. The training loop then evaluates the last refresh batch at the
    /// current weights and calls [`NaturalGradient::observe_loss_change`] before that step.
    pub fn wants_loss_change(&self) -> bool {
        self.period.is_some() && self.is_curvature_step(self.step)
    }

    /// Reports the loss of the last refresh step's batch at that step (`before`: the loss the
    /// step was computed from) and at the current weights of `model` (`after`: the same batch,
    /// curvature capture off), for adaptive damping; ignored when no period is pending. Pass
    /// detached values; nothing is read from the device here.
    pub fn observe_loss_change<M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        before: Tensor<B::InnerBackend, 1>,
        after: Tensor<B::InnerBackend, 1>,
    ) {
        if let Some(period) = self.period.take() {
            if let Some(predicted) = self.predicted_change(period, model) {
                self.reduction_ratio = Some((after - before) / predicted);
            }
        }
    }

    /// The damping for the refresh about to happen: the schedule's value, or the adaptive
    /// rule's (which reads the last reduction ratio: one scalar).
    pub(super) fn advance_damping(&mut self) {
        let config = &self.config.damping;
        if config.adaptive {
            if let Some(rho) = self.reduction_ratio.take() {
                // Every rank applies the same damping: the mean of the ranks' ratios. They share
                // the loss change, weights, gradients and curvature, so the ratios agree up to
                // rounding; the mean makes the damping identical even then. A NaN anywhere makes
                // the mean NaN: a bad step on all.
                let mut rho = [host::read_scalar(rho) as f32];
                self.comm.all_reduce_sum(&mut rho);
                let rho = f64::from(rho[0]) / self.comm.size() as f64;
                self.damping =
                    levenberg_marquardt(self.damping, rho, config.omega, config.min, config.max);
                tracing::debug!(rho, damping = self.damping, "adaptive damping");
            }
        } else {
            self.damping = config.value_after(self.refreshes);
        }
        self.refreshes += 1;
    }

    /// Starts a period at a refresh step: the preconditioned layers' parameters in `module`
    /// (before the update) and their gradients in `grads`.
    pub(super) fn start_period<M: AutodiffModule<B>>(
        &mut self,
        module: &M,
        grads: &GradientsParams,
    ) {
        let start = self.layer_matrices(module);
        let gradients = self
            .ordered_layers()
            .filter_map(|l| Some((l.meta.weight_id.val(), l.meta.gradient(grads)?)))
            .collect();
        self.period = Some(Period { start, gradients });
    }

    /// Each preconditioned layer's weight and bias in `module`, as `[d_out, d_in']`.
    fn layer_matrices<M: AutodiffModule<B>>(
        &self,
        module: &M,
    ) -> Vec<(u64, Tensor<B::InnerBackend, 2>)> {
        let ids: Vec<ParamId> = self
            .layers
            .values()
            .flat_map(|l| std::iter::once(l.meta.weight_id).chain(l.meta.bias_id))
            .collect();
        let mut params = LayerParams::<B::InnerBackend>::new(&ids);
        module.visit(&mut params);
        self.layers
            .values()
            .filter_map(|l| Some((l.meta.weight_id.val(), l.meta.gradient(&params.values)?)))
            .collect()
    }

    /// `q(Delta)` of the move from the period's start to the parameters of `updated`, with each
    /// layer's current curvature and the period's gradients.
    fn predicted_change<M: AutodiffModule<B>>(
        &self,
        period: Period<B::InnerBackend>,
        updated: &M,
    ) -> Option<Tensor<B::InnerBackend, 1>> {
        let now: std::collections::HashMap<u64, Tensor<B::InnerBackend, 2>> =
            self.layer_matrices(updated).into_iter().collect();
        let start: std::collections::HashMap<u64, Tensor<B::InnerBackend, 2>> =
            period.start.into_iter().collect();
        let mut terms = Vec::new();
        for (id, g) in period.gradients {
            let (Some(now), Some(start), Some(layer)) =
                (now.get(&id), start.get(&id), self.layers.get(&id))
            else {
                continue;
            };
            let delta = now.clone() - start.clone();
            let linear = (g * delta.clone()).sum();
            terms.push(linear + quadratic(&layer.curvature, delta) / 2.0);
        }
        (!terms.is_empty()).then(|| Tensor::cat(terms, 0).sum())
    }
}
