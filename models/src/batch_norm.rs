//! `BatchNorm2d`: Burn's `BatchNorm` for `[N, C, H, W]` inputs (same fields, record, running
//! statistics and results) written with the tensor layouts CPU backends run fast.
//!
//! Burn's `BatchNorm` broadcasts `[1, C, 1, 1]` vectors against `[N, C, H, W]` and swaps the
//! batch and channel dimensions; Burn's Flex CPU backend runs both through a scalar strided
//! iterator, which made BatchNorm 60% of a ResNet-32 training step (5.3 s of forward and
//! backward at batch 128, against 2.3 s for all convolutions). Here the input is viewed as
//! `[N, C, H*W]`, per-channel statistics are reductions over the contiguous last axis, and
//! per-channel vectors are materialised as contiguous `[N, C, 1]` columns, a layout Flex's SIMD
//! kernels handle: 10-20x faster on Flex, the same operations on the GPU backends.

use burn::config::Config;
use burn::module::{Initializer, Module, Param, RunningState};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Settings of [`BatchNorm2d`] (those of Burn's `BatchNormConfig`).
#[derive(Config, Debug)]
pub struct BatchNorm2dConfig {
    /// Number of channels.
    pub num_features: usize,
    /// Added to the variance for numerical stability.
    #[config(default = 1e-5)]
    pub epsilon: f64,
    /// Weight of the new batch in the running statistics.
    #[config(default = 0.1)]
    pub momentum: f64,
}

/// Batch normalisation over the channels of `[N, C, H, W]` inputs.
#[derive(Module, Debug)]
pub struct BatchNorm2d<B: Backend> {
    /// The learnable scale gamma.
    pub gamma: Param<Tensor<B, 1>>,
    /// The learnable shift beta.
    pub beta: Param<Tensor<B, 1>>,
    /// The running mean.
    pub running_mean: RunningState<Tensor<B, 1>>,
    /// The running (biased) variance.
    pub running_var: RunningState<Tensor<B, 1>>,
    /// Weight of the new batch in the running statistics.
    pub momentum: f64,
    /// Added to the variance for numerical stability.
    pub epsilon: f64,
}

impl BatchNorm2dConfig {
    /// The module, with unit scale, zero shift, zero mean and unit variance.
    pub fn init<B: Backend>(&self, device: &B::Device) -> BatchNorm2d<B> {
        let c = self.num_features;
        BatchNorm2d {
            gamma: Initializer::Ones.init([c], device),
            beta: Initializer::Zeros.init([c], device),
            running_mean: RunningState::new(Tensor::zeros([c], device)),
            running_var: RunningState::new(Tensor::ones([c], device)),
            momentum: self.momentum,
            epsilon: self.epsilon,
        }
    }
}

thread_local! {
    static FROZEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the running statistics of every [`BatchNorm2d`] left unchanged by forward
/// passes on this thread (they still normalise with the batch statistics under autodiff): for
/// extra evaluations of the training loss that must not count as training batches.
pub fn with_frozen_statistics<R>(f: impl FnOnce() -> R) -> R {
    let previous = FROZEN.with(|c| c.replace(true));
    let out = f();
    FROZEN.with(|c| c.set(previous));
    out
}

/// A per-channel vector `[C]` as the contiguous column `[n, C, 1]`.
fn column<B: Backend>(v: Tensor<B, 3>, n: usize) -> Tensor<B, 3> {
    v.repeat_dim(0, n)
}

impl<B: Backend> BatchNorm2d<B> {
    /// Normalises with the batch statistics while autodiff is on (and updates the running
    /// statistics), with the running statistics otherwise.
    pub fn forward(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, c, h, w] = input.dims();
        let x = input.reshape([n, c, h * w]);
        let (centered, var) = if B::ad_enabled(&x.device()) {
            let count = (n * h * w) as f64;
            let mean = x.clone().sum_dim(2).sum_dim(0) / count; // [1, C, 1]
            let centered = x - column(mean.clone(), n);
            let var = centered.clone().square().sum_dim(2).sum_dim(0) / count;
            if !FROZEN.with(|f| f.get()) {
                self.update_running(
                    mean.detach().reshape([c]),
                    var.clone().detach().reshape([c]),
                );
            }
            (centered, var)
        } else {
            let mean = self.running_mean.value().reshape([1, c, 1]);
            let var = self.running_var.value().reshape([1, c, 1]);
            (x - column(mean, n), var)
        };
        let scale = (var + self.epsilon).sqrt().recip() * self.gamma.val().reshape([1, c, 1]);
        let shift = self.beta.val().reshape([1, c, 1]);
        (centered * column(scale, n) + column(shift, n)).reshape([n, c, h, w])
    }

    fn update_running(&self, mean: Tensor<B, 1>, var: Tensor<B, 1>) {
        let m = self.momentum;
        let device = mean.device();
        let running_mean = self.running_mean.value_sync().to_device(&device);
        let running_var = self.running_var.value_sync().to_device(&device);
        self.running_mean
            .update(running_mean * (1.0 - m) + mean * m);
        self.running_var.update(running_var * (1.0 - m) + var * m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::module::AutodiffModule;
    use burn::nn::BatchNormConfig;
    use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
    use burn::tensor::{Distribution, TensorData};

    type A = Autodiff<Flex>;

    fn max_rel(a: Tensor<Flex, 4>, b: Tensor<Flex, 4>) -> f32 {
        let scale: f32 = b.clone().abs().max().into_scalar();
        let diff: f32 = (a - b).abs().max().into_scalar();
        diff / scale.max(1e-12)
    }

    #[test]
    fn matches_burns_batch_norm_in_outputs_gradients_and_statistics() {
        let dev = Default::default();
        let theirs = BatchNormConfig::new(5).init::<A>(&dev);
        // Non-trivial scale and shift, loaded into both through the record.
        let mut ours = BatchNorm2dConfig::new(5).init::<A>(&dev);
        ours.gamma = Param::from_tensor(Tensor::from_floats([1.5, -1.0, 2.0, 0.5, 0.1], &dev));
        ours.beta = Param::from_tensor(Tensor::from_floats([0.3, 0.0, -0.2, 1.0, 5.0], &dev));
        let bytes = BinBytesRecorder::<FullPrecisionSettings>::new()
            .record(ours.clone().into_record(), ())
            .unwrap();
        let theirs = theirs.load_record(
            BinBytesRecorder::<FullPrecisionSettings>::new()
                .load(bytes, &dev)
                .unwrap(),
        );
        let weights = Tensor::<A, 4>::random([3, 5, 7, 6], Distribution::Normal(0.0, 1.0), &dev);
        for step in 0..3 {
            let x =
                Tensor::<A, 4>::random([3, 5, 7, 6], Distribution::Normal(step as f64, 2.0), &dev)
                    .require_grad();
            let y_ours = ours.forward(x.clone());
            let g = (y_ours.clone() * weights.clone()).sum().backward();
            let ours_grads = [
                x.grad(&g).unwrap(),
                ours.gamma.val().grad(&g).unwrap().reshape([1, 1, 1, 5]),
                ours.beta.val().grad(&g).unwrap().reshape([1, 1, 1, 5]),
            ];
            let y_theirs = theirs.forward(x.clone());
            let g = (y_theirs.clone() * weights.clone()).sum().backward();
            let their_grads = [
                x.grad(&g).unwrap(),
                theirs.gamma.val().grad(&g).unwrap().reshape([1, 1, 1, 5]),
                theirs.beta.val().grad(&g).unwrap().reshape([1, 1, 1, 5]),
            ];
            assert!(max_rel(y_ours.inner(), y_theirs.inner()) < 1e-5);
            for (a, b) in ours_grads.into_iter().zip(their_grads) {
                assert!(max_rel(a, b) < 1e-4, "step {step}");
            }
        }
        for (a, b) in [
            (
                ours.running_mean.value_sync(),
                theirs.running_mean.value_sync(),
            ),
            (
                ours.running_var.value_sync(),
                theirs.running_var.value_sync(),
            ),
        ] {
            assert!(
                max_rel(
                    a.inner().reshape([1, 1, 1, 5]),
                    b.inner().reshape([1, 1, 1, 5])
                ) < 1e-5
            );
        }
        // Inference uses the running statistics, as Burn's does.
        let x = Tensor::<Flex, 4>::from_data(
            TensorData::new((0..60).map(|v| v as f32 / 7.0).collect(), [2, 5, 3, 2]),
            &dev,
        );
        let (ours, theirs) = (ours.valid(), theirs.valid());
        assert!(max_rel(ours.forward(x.clone()), theirs.forward(x)) < 1e-5);
    }

    #[test]
    fn frozen_statistics_are_left_unchanged_by_training_forwards() {
        let dev = Default::default();
        let bn = BatchNorm2dConfig::new(3).init::<A>(&dev);
        let x = Tensor::<A, 4>::random([4, 3, 5, 5], Distribution::Normal(2.0, 3.0), &dev);
        let frozen = with_frozen_statistics(|| bn.forward(x.clone()));
        assert_eq!(
            bn.running_mean.value_sync().into_data(),
            Tensor::<A, 1>::zeros([3], &dev).into_data()
        );
        // Still normalised with the batch statistics, as an unfrozen training forward is.
        let unfrozen = bn.forward(x);
        assert!(max_rel(frozen.inner(), unfrozen.inner()) < 1e-6);
        let moved: f32 = bn.running_mean.value_sync().abs().sum().into_scalar();
        assert!(moved > 0.1, "{moved}");
    }
}
