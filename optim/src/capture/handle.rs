//! The shared capture handle: arms curvature steps and collects what the wrappers recorded.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use burn::module::{AutodiffModule, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use super::geometry::LayerGeometry;

/// What a wrapper records in the forward pass of a curvature step (type-erased over the backend).
pub(crate) struct PendingCapture<B: Backend> {
    pub weight_id: ParamId,
    pub bias_id: Option<ParamId>,
    pub geometry: LayerGeometry,
    /// Layer input, detached: Linear `[n, L, d_in]`, Conv2d `[n, C, H, W]`.
    pub input: RawInput<B>,
    /// Zero probe added to the output, shaped `[n, L, d_out]` (Linear) or `[n, d_out, L]` (Conv2d).
    pub probe: Tensor<B, 3>,
}

/// A recorded layer input.
pub(crate) enum RawInput<B: Backend> {
    Linear(Tensor<B, 3>),
    Conv(Tensor<B, 4>),
}

/// One layer's curvature data after backward: the input and dL/dy of every sample.
#[derive(Clone, Debug)]
pub struct LayerCapture<B: Backend> {
    /// Id of the layer's weight parameter (the layer's identity).
    pub weight_id: ParamId,
    /// Id of the layer's bias parameter, if it has one.
    pub bias_id: Option<ParamId>,
    /// The layer's shape and convolution settings.
    pub geometry: LayerGeometry,
    /// Layer input: Linear `[n, L, d_in]`, Conv2d `[n, C, H, W]` (no bias column yet).
    pub input: CapturedInput<B>,
    /// Output gradient dL/dy as backward gives it: Linear `[n, L, d_out]`, Conv2d `[n, d_out, L]`.
    pub output_grad: Tensor<B, 3>,
}

/// A layer input recorded on a curvature step.
#[derive(Clone, Debug)]
pub enum CapturedInput<B: Backend> {
    /// Input of a Linear layer, `[n, L, d_in]` (L = 1 for plain 2-D inputs).
    Linear(Tensor<B, 3>),
    /// Input of a Conv2d layer, `[n, C, H, W]`, before padding.
    Conv(Tensor<B, 4>),
}

#[derive(Default)]
struct CaptureState {
    pending: Vec<Box<dyn Any + Send>>,
    collected: Vec<Box<dyn Any + Send>>,
    period: PeriodExchange,
}

/// Adaptive damping's exchange between the training loop and the optimizer, through the handle
/// they share (see [`CaptureHandle::gradients_with_loss`]).
#[derive(Default)]
struct PeriodExchange {
    /// Set by the optimizer: the next step starts a period (keep its batch and loss).
    start_next: bool,
    /// Set by the optimizer: the next step ends a period (evaluate the kept batch).
    end_next: bool,
    /// The first batch of the period under way.
    batch: Option<Box<dyn Any + Send>>,
    /// For the optimizer: the loss of the batch that started a period (`Tensor<I, 1>`).
    started: Option<Box<dyn Any + Send>>,
    /// For the optimizer: the kept batch's loss at the current weights (`Tensor<I, 1>`).
    ended: Option<Box<dyn Any + Send>>,
}

/// Shared between a model's capture wrappers and the optimizer that reads their records.
///
/// The optimizer arms the handle before a curvature step; the wrappers then record their inputs
/// and attach probes in the next autodiff forward pass; after `backward`, [`CaptureHandle::collect`]
/// (or [`CaptureHandle::gradients`]) reads the probes' gradients. Clones share the same state.
#[derive(Clone, Default)]
pub struct CaptureHandle {
    armed: Arc<AtomicBool>,
    state: Arc<Mutex<CaptureState>>,
}

impl core::fmt::Debug for CaptureHandle {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CaptureHandle")
            .field("armed", &self.is_armed())
            .finish()
    }
}

impl CaptureHandle {
    /// A new handle, disarmed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests (or cancels) curvature capture in the next autodiff forward pass.
    pub fn arm(&self, armed: bool) {
        self.armed.store(armed, Ordering::SeqCst);
        if !armed {
            self.lock().pending.clear();
        }
    }

    /// True when the next autodiff forward pass records curvature data.
    pub fn is_armed(&self) -> bool {
        self.armed.load(Ordering::SeqCst)
    }

    /// Runs `f` (forward passes that are not training steps) with capture off, then re-arms
    /// the handle as it was; the pending captures are kept.
    pub fn without_capture<R>(&self, f: impl FnOnce() -> R) -> R {
        let armed = self.armed.swap(false, Ordering::SeqCst);
        let out = f();
        self.armed.store(armed, Ordering::SeqCst);
        out
    }

    fn lock(&self) -> MutexGuard<'_, CaptureState> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep going.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Called by the wrappers: records one layer's input and probe on an armed autodiff pass.
    pub(crate) fn record<B: Backend>(&self, capture: PendingCapture<B>) {
        self.lock().pending.push(Box::new(capture));
    }

    /// Reads the probes' gradients after backward and keeps every layer's data for the optimizer.
    ///
    /// Call it between `loss.backward()` and `GradientsParams::from_grads`; it does nothing on
    /// steps that were not curvature steps.
    pub fn collect<B: AutodiffBackend>(&self, grads: &B::Gradients) {
        let mut state = self.lock();
        let pending = std::mem::take(&mut state.pending);
        for entry in pending {
            let Ok(capture) = entry.downcast::<PendingCapture<B>>() else {
                tracing::warn!("curvature capture from another backend was ignored");
                continue;
            };
            let Some(output_grad) = capture.probe.grad(grads) else {
                tracing::warn!(
                    "layer {} recorded a capture but its output took no part in the loss",
                    capture.weight_id
                );
                continue;
            };
            let input = match capture.input {
                RawInput::Linear(x) => CapturedInput::Linear(x.inner()),
                RawInput::Conv(x) => CapturedInput::Conv(x.inner()),
            };
            state
                .collected
                .push(Box::new(LayerCapture::<B::InnerBackend> {
                    weight_id: capture.weight_id,
                    bias_id: capture.bias_id,
                    geometry: capture.geometry,
                    input,
                    output_grad,
                }));
        }
        self.armed.store(false, Ordering::SeqCst);
    }

    /// `collect` followed by `GradientsParams::from_grads`: the one call a training loop needs.
    pub fn gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        grads: B::Gradients,
        module: &M,
    ) -> GradientsParams {
        self.collect::<B>(&grads);
        GradientsParams::from_grads(grads, module)
    }

    /// [`CaptureHandle::gradients`] for a training loop with adaptive damping (the default): the
    /// one call such a loop needs. `loss` is this step's loss on `batch`; `loss_of` computes
    /// the loss of a batch with a model (as the step did). When the optimizer says that this
    /// step starts a curvature period, the handle keeps `batch` and the loss; when it ends one,
    /// it evaluates the kept batch at the current weights with `loss_of` (capture off) and hands
    /// both losses to the optimizer, whose next `step` adapts the damping. Nothing is read from
    /// the device here. On other steps this is `gradients(loss.backward(), module)`.
    ///
    /// `loss_of` runs one more forward pass per period; the floats of `module` that no gradient
    /// updates (Burn's `BatchNorm` running mean and variance, any `RunningState`) are put back
    /// as they were after it, so batch-norm layers keep the statistics of the training steps.
    pub fn gradients_with_loss<B, M, T>(
        &self,
        loss: Tensor<B, 1>,
        module: &M,
        batch: &T,
        loss_of: impl FnOnce(&M, &T) -> Tensor<B, 1>,
    ) -> GradientsParams
    where
        B: AutodiffBackend,
        M: AutodiffModule<B>,
        T: Clone + Send + 'static,
    {
        let (start, end, kept) = {
            let mut state = self.lock();
            let kept = if state.period.end_next {
                state.period.batch.take()
            } else {
                None
            };
            (state.period.start_next, state.period.end_next, kept)
        };
        if end {
            if let Some(kept) = kept.and_then(|k| k.downcast::<T>().ok()) {
                // The extra forward pass records nothing. Burn's BatchNorm (any running state)
                // would move its statistics in it: they are put back as they were.
                let after = self.without_capture(|| {
                    let statistics = super::statistics::Statistics::<B>::save(module);
                    let after = loss_of(module, &kept).detach().inner();
                    statistics.restore(module);
                    after
                });
                self.lock().period.ended = Some(Box::new(after));
            }
        }
        if start {
            let mut state = self.lock();
            state.period.batch = Some(Box::new(batch.clone()));
            state.period.started = Some(Box::new(loss.clone().detach().inner()));
        }
        self.gradients(loss.backward(), module)
    }

    /// Gives back the first batch of the period under way after a resume from a checkpoint
    /// (the optimizer's record holds the rest of the period, not the batch), so that adaptive
    /// damping judges that period too.
    pub fn restore_period_batch<T: Send + 'static>(&self, batch: T) {
        self.lock().period.batch = Some(Box::new(batch));
    }

    /// Called by the optimizer after each step: whether the next step starts and whether it
    /// ends a curvature period (adaptive damping).
    pub(crate) fn request_period(&self, start_next: bool, end_next: bool) {
        let mut state = self.lock();
        state.period.start_next = start_next;
        state.period.end_next = end_next;
    }

    /// For the optimizer: the loss of the batch that started a period at this step, and the
    /// kept batch's loss at the current weights when this step ends one.
    pub(crate) fn take_period_losses<I: Backend>(
        &self,
    ) -> (Option<Tensor<I, 1>>, Option<Tensor<I, 1>>) {
        let mut state = self.lock();
        let take = |slot: Option<Box<dyn Any + Send>>| {
            slot.and_then(|b| b.downcast::<Tensor<I, 1>>().ok())
                .map(|t| *t)
        };
        let started = take(state.period.started.take());
        let ended = take(state.period.ended.take());
        (started, ended)
    }

    /// Takes the collected layer data (for the optimizer); the handle is empty afterwards.
    ///
    /// A layer recorded more than once in the same step (a shared layer, or several forward
    /// passes) keeps its first record.
    pub fn take<B: Backend>(&self) -> Vec<LayerCapture<B>> {
        let collected = std::mem::take(&mut self.lock().collected);
        let mut out: Vec<LayerCapture<B>> = Vec::with_capacity(collected.len());
        for entry in collected {
            if let Ok(capture) = entry.downcast::<LayerCapture<B>>() {
                if out.iter().any(|c| c.weight_id == capture.weight_id) {
                    tracing::warn!(
                        "layer {} was recorded twice in one curvature step; the first record is used",
                        capture.weight_id
                    );
                    continue;
                }
                out.push(*capture);
            }
        }
        out
    }

    /// Number of layers recorded in the forward pass and not yet collected.
    pub fn pending_len(&self) -> usize {
        self.lock().pending.len()
    }
}
