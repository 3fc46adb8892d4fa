//! Models with Burn's own `BatchNorm` under the default recipe: adaptive damping's extra forward
//! pass over each period's first batch (`CaptureHandle::gradients_with_loss`) leaves the running
//! statistics exactly as the training steps left them, with a loss closure that does nothing
//! special about batch norm.
#![allow(clippy::disallowed_methods)] // Tests and examples read the device freely.

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{BatchNorm, BatchNormConfig, LinearConfig};
use burn::optim::Optimizer;
use burn::tensor::{Int, Tensor};
use common::models::*;
use common::*;
use hylo_optim::{CaptureHandle, CapturedLinear, CurvatureConfig, SngdConfig};

#[derive(Module, Debug)]
struct Net<B: burn::tensor::backend::Backend> {
    l1: CapturedLinear<B>,
    bn: BatchNorm<B>,
    l2: CapturedLinear<B>,
}

impl Net<TB> {
    fn new(capture: &CaptureHandle) -> Self {
        let device = Default::default();
        let _rng = rng_lock();
        <TB as burn::tensor::backend::Backend>::seed(&device, 9);
        materialised(Self {
            l1: CapturedLinear::from_config(&LinearConfig::new(8, 16), capture, &device),
            bn: BatchNormConfig::new(16).init(&device),
            l2: CapturedLinear::from_config(&LinearConfig::new(16, 4), capture, &device),
        })
    }

    fn forward(&self, x: Tensor<TB, 2>) -> Tensor<TB, 2> {
        // Burn's BatchNorm takes [batch, channels, ...]: one position per sample.
        let [n, c] = [x.dims()[0], 16];
        let h = self.bn.forward(self.l1.forward(x).reshape([n, c, 1]));
        self.l2
            .forward(burn::tensor::activation::relu(h.reshape([n, c])))
    }
}

/// The running mean and variance, committed (a record synchronises Burn's running states).
fn statistics(model: &Net<TB>) -> Vec<f64> {
    struct Each(Vec<f64>);
    impl ModuleVisitor<TB> for Each {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TB, D>>) {
            if !param.val().is_require_grad() {
                self.0.extend(to_vec(param.val().inner()));
            }
        }
    }
    let _ = model.clone().into_record();
    let mut each = Each(Vec::new());
    model.visit(&mut each);
    each.0
}

#[test]
fn the_periods_extra_forward_pass_leaves_burns_batchnorm_statistics_alone() {
    let capture = CaptureHandle::new();
    let mut optim = SngdConfig::new()
        .with_curvature(CurvatureConfig::new().with_freq(3))
        .init::<TB>(&capture)
        .unwrap();
    let mut model = Net::new(&capture);
    let (x, y) = mlp_problem(64, 8, 4);
    let batches: Vec<(Tensor<TB, 2>, Tensor<TB, 1, Int>)> = (0..4)
        .map(|k| {
            (
                x.clone().slice(k * 16..(k + 1) * 16),
                y.clone().slice(k * 16..(k + 1) * 16),
            )
        })
        .collect();
    // A plain loss: Burn's BatchNorm updates its statistics on every training forward pass.
    let loss_of = |m: &Net<TB>, b: &(Tensor<TB, 2>, Tensor<TB, 1, Int>)| {
        cross_entropy(m.forward(b.0.clone()), b.1.clone())
    };
    let mut judged = 0;
    for step in 0..13 {
        let batch = &batches[step % 4];
        let loss = loss_of(&model, batch);
        let after_forward = statistics(&model);
        let ends_period = optim.wants_loss_change();
        let grads = capture.gradients_with_loss(loss, &model, batch, loss_of);
        assert_eq!(
            statistics(&model),
            after_forward,
            "step {step}: the statistics moved in gradients_with_loss"
        );
        if ends_period {
            // The check is not vacuous: the same kind of forward pass by hand does move them
            // (training goes on from there, which changes nothing about the checks).
            let _ = loss_of(&model, &batches[0]);
            assert_ne!(statistics(&model), after_forward, "step {step}");
        }
        model = optim.step(0.1, model, grads);
        if optim.last_known().period.is_some() {
            judged += 1;
        }
    }
    assert!(judged >= 3, "{judged} periods judged");
}
