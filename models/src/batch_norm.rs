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
use burn::module::{AutodiffModule, Initializer, Module, ModuleVisitor, Param, RunningState};
use burn::tensor::backend::{AutodiffBackend, Backend};
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
    static AVERAGING: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
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

/// Runs `f`, the forward pass of batch `index` (from 0) of a recalibration, with the running
/// statistics of every [`BatchNorm2d`] on this thread set to the plain average over the
/// recalibration's batches (batch `index` weighs `1 / (index + 1)`, so batch 0 replaces the old
/// statistics): after `k` batches they are the mean of their `k` batch statistics, as "precise
/// BatchNorm" computes them for evaluation.
pub fn with_statistics_averaged<R>(index: u64, f: impl FnOnce() -> R) -> R {
    let previous = AVERAGING.with(|c| c.replace(Some(index)));
    let out = f();
    AVERAGING.with(|c| c.set(previous));
    out
}

/// Whether `module` holds running statistics (floats that no gradient updates, such as
/// [`BatchNorm2d`]'s mean and variance).
pub fn has_running_statistics<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M) -> bool {
    struct Find(bool);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Find {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 |= !param.val().is_require_grad();
        }
    }
    let mut find = Find(false);
    module.visit(&mut find);
    find.0
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
        let m = AVERAGING
            .with(|a| a.get())
            .map_or(self.momentum, |index| 1.0 / (index as f64 + 1.0));
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

    #[test]
    fn averaged_statistics_are_the_mean_of_the_batches_statistics() {
        let dev = Default::default();
        let bn = BatchNorm2dConfig::new(3).init::<A>(&dev);
        // Statistics from earlier training that the recalibration must forget.
        bn.forward(Tensor::<A, 4>::random(
            [4, 3, 5, 5],
            Distribution::Normal(-7.0, 9.0),
            &dev,
        ));
        let batches: Vec<Tensor<A, 4>> = (0..3)
            .map(|i| {
                Tensor::random(
                    [4, 3, 5, 5],
                    Distribution::Normal(i as f64, 1.0 + i as f64),
                    &dev,
                )
            })
            .collect();
        for (i, x) in batches.iter().enumerate() {
            with_statistics_averaged(i as u64, || bn.forward(x.clone()));
        }
        // The batches' own statistics, per channel: mean over N, H, W; biased variance.
        let stats = |x: &Tensor<A, 4>| {
            let x = x.clone().inner().swap_dims(0, 1).reshape([3, 100]);
            let mean = x.clone().mean_dim(1);
            let var = (x - mean.clone()).square().mean_dim(1);
            (mean.reshape([3]), var.reshape([3]))
        };
        let (mut mean, mut var) = (
            Tensor::<Flex, 1>::zeros([3], &dev),
            Tensor::zeros([3], &dev),
        );
        for x in &batches {
            let (m, v) = stats(x);
            mean = mean + m / 3.0;
            var = var + v / 3.0;
        }
        let close = |a: Tensor<Flex, 1>, b: Tensor<Flex, 1>| {
            max_rel(a.reshape([1, 1, 1, 3]), b.reshape([1, 1, 1, 3])) < 1e-5
        };
        assert!(close(bn.running_mean.value_sync().inner(), mean));
        assert!(close(bn.running_var.value_sync().inner(), var));
        // Outside the recalibration the module's own momentum applies again.
        let before = bn.running_mean.value_sync().inner();
        let x = Tensor::<A, 4>::random([4, 3, 5, 5], Distribution::Normal(5.0, 1.0), &dev);
        let (m, _) = stats(&x);
        bn.forward(x);
        assert!(close(
            bn.running_mean.value_sync().inner(),
            before * 0.9 + m * 0.1
        ));
    }

    #[test]
    fn running_statistics_are_found_in_batch_norm_layers_only() {
        let dev = Default::default();
        assert!(has_running_statistics::<A, _>(
            &BatchNorm2dConfig::new(3).init::<A>(&dev)
        ));
        assert!(!has_running_statistics::<A, _>(
            &burn::nn::LinearConfig::new(3, 2).init::<A>(&dev)
        ));
    }
}
