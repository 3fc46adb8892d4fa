//! The shipped recipe (grafting, GradientScale rows, adaptive damping, momentum) with its
//! step-length trust region: the quadratic model `q` against a dense oracle on a Conv2d +
//! BatchNorm + Linear model, a step that is too long gets shortened, a rejection retries shorter,
//! and the optimizer gives up with an error after too many rejections in a row.
#![allow(clippy::disallowed_methods)] // Tests and examples read the device freely.

mod common;

use std::collections::BTreeMap;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::nn::conv::Conv2dConfig;
use burn::nn::{BatchNorm, BatchNormConfig, LinearConfig, PaddingConfig2d};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::activation::relu;
use burn::tensor::{Int, Tensor};
use common::models::*;
use common::*;
use hylo_optim::{
    CaptureHandle, CapturedConv2d, CapturedLinear, CurvatureConfig, DampingConfig, GaveUp,
    NaturalGradient, PeriodVerdict, SngdConfig, StepLengthConfig, TrainingError,
};

/// Conv2d 1->3 (3x3, padding 1, bias) on 6x6 images, BatchNorm, ReLU, Linear 108->4.
#[derive(Module, Debug)]
struct ConvBnNet<B: burn::tensor::backend::Backend> {
    conv: CapturedConv2d<B>,
    bn: BatchNorm<B>,
    fc: CapturedLinear<B>,
}

/// The tensors a dense oracle needs from one forward pass: the conv input, the fc input, and
/// the probes added to both layers' outputs.
struct Traced {
    logits: Tensor<TB, 2>,
    fc_input: Tensor<TB, 2>,
    conv_probe: Tensor<TB, 4>,
    fc_probe: Tensor<TB, 2>,
}

impl ConvBnNet<TB> {
    fn new(capture: &CaptureHandle) -> Self {
        let device = Default::default();
        let _rng = rng_lock();
        <TB as burn::tensor::backend::Backend>::seed(&device, 21);
        materialised(Self {
            conv: CapturedConv2d::from_config(
                &Conv2dConfig::new([1, 3], [3, 3])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)),
                capture,
                &device,
            )
            .unwrap(),
            bn: BatchNormConfig::new(3).init(&device),
            fc: CapturedLinear::from_config(&LinearConfig::new(108, 4), capture, &device),
        })
    }

    fn forward(&self, x: Tensor<TB, 4>) -> Tensor<TB, 2> {
        self.traced(x).logits
    }

    /// The forward pass with zero probes on the two layers' outputs (their gradients are
    /// dL/dy).
    fn traced(&self, x: Tensor<TB, 4>) -> Traced {
        let [n, ..] = x.dims();
        let device = x.device();
        let conv_probe = Tensor::<TB, 4>::zeros([n, 3, 6, 6], &device).require_grad();
        let h = self.conv.forward(x) + conv_probe.clone();
        let h = relu(self.bn.forward(h));
        let fc_input = h.reshape([n, 108]);
        let fc_probe = Tensor::<TB, 2>::zeros([n, 4], &device).require_grad();
        let logits = self.fc.forward(fc_input.clone()) + fc_probe.clone();
        Traced {
            logits,
            fc_input,
            conv_probe,
            fc_probe,
        }
    }
}

fn images(n: usize) -> (Tensor<TB, 4>, Tensor<TB, 1, Int>) {
    let (x, y) = cnn_problem(n);
    // The 8x8 problem cut to 6x6 (the blobs stay inside).
    (x.slice([0..n, 0..1, 1..7, 1..7]), y)
}

/// Every float of a module by id, flattened to f64.
#[derive(Default)]
struct Floats(BTreeMap<u64, Vec<f64>>);

impl ModuleVisitor<TB> for Floats {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TB, D>>) {
        self.0.insert(param.id.val(), to_vec(param.val().inner()));
    }
}

fn floats<M: Module<TB>>(model: &M) -> BTreeMap<u64, Vec<f64>> {
    let mut f = Floats::default();
    model.visit(&mut f);
    f.0
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// What the dense oracle keeps of an inversion step: the gradients of the preconditioned
/// layers' parameters and each layer's rows `(a_i, g_i)` as GradientScale defines them.
struct Start {
    floats: BTreeMap<u64, Vec<f64>>,
    gradients: BTreeMap<u64, Vec<f64>>,
    /// Conv rows: `a_i` = mean over the 36 output positions of the 3x3 patch (9 values) and 1,
    /// `g_i` = n * the sum over positions of dL/dy (3 values).
    conv_rows: Vec<(Vec<f64>, Vec<f64>)>,
    /// Linear rows: `a_i` = the input and 1, `g_i` = n * dL/dz.
    fc_rows: Vec<(Vec<f64>, Vec<f64>)>,
    before: Tensor<burn::backend::Flex, 1>,
}

/// The mean 3x3 patch (padding 1) of every image of `x` `[n, 1, 6, 6]` over the 36 positions.
fn mean_patches(x: &[f64], n: usize) -> Vec<Vec<f64>> {
    (0..n)
        .map(|i| {
            let mut a = vec![0.0; 10];
            for u in 0..3 {
                for v in 0..3 {
                    let mut sum = 0.0;
                    for r in 0..6 {
                        for c in 0..6 {
                            let (rr, cc) = (r + u, c + v);
                            if (1..=6).contains(&rr) && (1..=6).contains(&cc) {
                                sum += x[i * 36 + (rr - 1) * 6 + (cc - 1)];
                            }
                        }
                    }
                    a[u * 3 + v] = sum / 36.0;
                }
            }
            a[9] = 1.0;
            a
        })
        .collect()
}

/// `(1/n) sum_i (g_i^T D a_i)^2` for a layer step `D` `[d_out, d_in']` (row-major).
fn fisher_quadratic(rows: &[(Vec<f64>, Vec<f64>)], delta: &[f64]) -> f64 {
    let d_in = rows[0].0.len();
    rows.iter()
        .map(|(a, g)| {
            let s: f64 = g
                .iter()
                .enumerate()
                .map(|(r, gr)| gr * dot(&delta[r * d_in..(r + 1) * d_in], a))
                .sum();
            s * s
        })
        .sum::<f64>()
        / rows.len() as f64
}

#[test]
fn the_shipped_recipe_predicts_with_the_dense_quadratic_model_of_a_conv_batchnorm_net() {
    let capture = CaptureHandle::new();
    // The defaults (grafting, GradientScale rows, adaptive damping from 1, momentum 0.9, the
    // step-length trust region), refreshed every 3 steps.
    let mut optim = SngdConfig::new()
        .with_curvature(CurvatureConfig::new().with_freq(3))
        .init::<TB>(&capture)
        .unwrap();
    let mut model = ConvBnNet::new(&capture);
    let n = 16;
    let (x, y) = images(n);
    let x_host = to_vec(x.clone().inner());
    let loss_of = |m: &ConvBnNet<TB>| cross_entropy(m.forward(x.clone()), y.clone());
    let ids = |m: &ConvBnNet<TB>| {
        [
            m.conv.inner.weight.id.val(),
            m.conv.inner.bias.as_ref().unwrap().id.val(),
            m.fc.inner.weight.id.val(),
            m.fc.inner.bias.as_ref().unwrap().id.val(),
        ]
    };
    let [conv_w, conv_b, fc_w, fc_b] = ids(&model);
    let mut start: Option<Start> = None;
    let mut checked = 0;
    let mut quadratic_share = 0.0f64;
    for step in 0..12 {
        if optim.wants_loss_change() {
            let s = start.take().unwrap();
            let now = floats(&model);
            let delta = |id: u64| -> Vec<f64> {
                now[&id]
                    .iter()
                    .zip(&s.floats[&id])
                    .map(|(a, b)| a - b)
                    .collect()
            };
            let linear: f64 = [conv_w, conv_b, fc_w, fc_b]
                .iter()
                .map(|id| dot(&s.gradients[id], &delta(*id)))
                .sum();
            // The layers' steps as [d_out, d_in'] matrices: conv [3, 9 | 1], fc [4, 108 | 1]
            // (Burn's Linear weight is [d_in, d_out]).
            let (dw, db) = (delta(conv_w), delta(conv_b));
            let conv_delta: Vec<f64> = (0..3)
                .flat_map(|r| dw[r * 9..(r + 1) * 9].iter().copied().chain([db[r]]))
                .collect();
            let (dw, db) = (delta(fc_w), delta(fc_b));
            let fc_delta: Vec<f64> = (0..4)
                .flat_map(|r| (0..108).map(move |c| (r, c)))
                .map(|(r, c)| dw[c * 4 + r])
                .collect::<Vec<_>>()
                .chunks(108)
                .zip(&db)
                .flat_map(|(row, b)| row.iter().copied().chain([*b]).collect::<Vec<_>>())
                .collect();
            let quadratic = fisher_quadratic(&s.conv_rows, &conv_delta)
                + fisher_quadratic(&s.fc_rows, &fc_delta);
            let expected = linear + quadratic / 2.0;
            let bn_linear: f64 = [model.bn.gamma.id.val(), model.bn.beta.id.val()]
                .iter()
                .map(|id| {
                    let g = s.gradients.get(id).cloned().unwrap_or_default();
                    dot(&g, &delta(*id))
                })
                .sum();
            capture.arm(false);
            let after = loss_of(&model).inner();
            capture.arm(optim.is_curvature_step(optim.steps()));
            optim.observe_loss_change(&model, s.before, after);
            let traced_model = model.clone();
            let loss = loss_of(&model);
            let grads = capture.gradients(loss.backward(), &model);
            model = optim.step(0.1, model, grads);
            let PeriodVerdict::Adapted { predicted, .. } = optim.last_report().period.unwrap()
            else {
                panic!("step {step}: rejected")
            };
            assert!(
                (predicted - expected).abs() <= 1e-3 * expected.abs(),
                "step {step}: predicted {predicted}, dense oracle {expected} (linear {linear}, \
                 quadratic {quadratic})"
            );
            // BatchNorm's moves would be visible; the curvature term's weight is checked below.
            assert!(bn_linear.abs() > 1e-3 * expected.abs(), "step {step}");
            quadratic_share = quadratic_share.max(quadratic / 2.0 / expected.abs());
            checked += 1;
            // This step is an inversion too: the oracle's start for the next period.
            start = Some(oracle_start(&traced_model, &x, &y, &x_host, n, &capture));
            continue;
        }
        if optim.is_inversion_step(optim.steps()) {
            start = Some(oracle_start(&model, &x, &y, &x_host, n, &capture));
        }
        let loss = loss_of(&model);
        let grads = capture.gradients(loss.backward(), &model);
        model = optim.step(0.1, model, grads);
    }
    assert_eq!(checked, 3);
    // The quadratic term matters: without it the comparisons would fail.
    assert!(quadratic_share > 0.05, "{quadratic_share}");
    assert!(optim.step_scale() > 0.0 && optim.step_scale() <= 1.0);
}

/// The oracle's view of an inversion step at `model`: floats, gradients, rows and loss (the
/// capture is left as it was).
fn oracle_start(
    model: &ConvBnNet<TB>,
    x: &Tensor<TB, 4>,
    y: &Tensor<TB, 1, Int>,
    x_host: &[f64],
    n: usize,
    capture: &CaptureHandle,
) -> Start {
    let armed = capture.is_armed();
    capture.arm(false);
    let traced = model.traced(x.clone());
    let loss = cross_entropy(traced.logits.clone(), y.clone());
    let before = loss.clone().inner();
    let grads = loss.backward();
    capture.arm(armed);
    let conv_g = to_vec(traced.conv_probe.grad(&grads).unwrap());
    let fc_g = to_vec(traced.fc_probe.grad(&grads).unwrap());
    let fc_a = to_vec(traced.fc_input.clone().inner());
    let conv_a = mean_patches(x_host, n);
    let conv_rows = (0..n)
        .map(|i| {
            let g = (0..3)
                .map(|c| {
                    n as f64
                        * conv_g[(i * 3 + c) * 36..(i * 3 + c + 1) * 36]
                            .iter()
                            .sum::<f64>()
                })
                .collect();
            (conv_a[i].clone(), g)
        })
        .collect();
    let fc_rows = (0..n)
        .map(|i| {
            let mut a = fc_a[i * 108..(i + 1) * 108].to_vec();
            a.push(1.0);
            let g = fc_g[i * 4..(i + 1) * 4]
                .iter()
                .map(|v| v * n as f64)
                .collect();
            (a, g)
        })
        .collect();
    let params = GradientsParams::from_grads(grads, model);
    let mut gradients = BTreeMap::new();
    struct Collect<'a>(&'a GradientsParams, &'a mut BTreeMap<u64, Vec<f64>>);
    impl ModuleVisitor<TB> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<TB, D>>) {
            if let Some(g) = self.0.get::<IB, D>(param.id) {
                self.1.insert(param.id.val(), to_vec(g));
            }
        }
    }
    model.visit(&mut Collect(&params, &mut gradients));
    Start {
        floats: floats(model),
        gradients,
        conv_rows,
        fc_rows,
        before,
    }
}

/// Trains the MLP problem full-batch with the default recipe at `lr` for `steps` steps through
/// the capture handle's period bookkeeping; returns the losses and the optimizer.
fn train_mlp(
    step_length: StepLengthConfig,
    lr: f64,
    steps: usize,
) -> (Vec<f64>, NaturalGradient<TB>) {
    let capture = CaptureHandle::new();
    let mut optim = SngdConfig::new()
        .with_curvature(
            CurvatureConfig::new()
                .with_freq(5)
                .with_step_length(step_length),
        )
        .init::<TB>(&capture)
        .unwrap();
    let mut model = Mlp::<TB>::new(8, 16, 4, &capture);
    let (x, y) = mlp_problem(64, 8, 4);
    let batch = (x, y);
    let loss_of = |m: &Mlp<TB>, b: &(Tensor<TB, 2>, Tensor<TB, 1, Int>)| {
        cross_entropy(m.forward(b.0.clone()), b.1.clone())
    };
    let mut losses = Vec::new();
    for _ in 0..steps {
        let loss = loss_of(&model, &batch);
        losses.push(loss.clone().into_scalar() as f64);
        let grads = capture.gradients_with_loss(loss, &model, &batch, loss_of);
        model = optim.step(lr, model, grads);
    }
    (losses, optim)
}

#[test]
fn a_step_too_long_for_the_curvature_is_shortened() {
    // Grafted onto SGD's step at a learning rate far too high for this problem, with momentum
    // 0.9: the fixed step length keeps overshooting; the trust region shortens it and the loss
    // comes down.
    let (lr, steps) = (3.0, 80);
    let (fixed, _) = train_mlp(StepLengthConfig::new().with_adaptive(false), lr, steps);
    let (adapted, optim) = train_mlp(StepLengthConfig::new(), lr, steps);
    let tail = |l: &[f64]| l[steps - 10..].iter().sum::<f64>() / 10.0;
    assert!(
        optim.step_scale() < 1.0,
        "the step was never shortened: {adapted:?}"
    );
    assert!(
        tail(&adapted) < 0.7 * tail(&fixed),
        "adapted {:.4} vs fixed {:.4}\n{adapted:?}\n{fixed:?}",
        tail(&adapted),
        tail(&fixed)
    );
    assert!(tail(&adapted) < 0.8 * adapted[0], "{adapted:?}");
}

#[test]
fn a_rejected_period_retries_with_a_shorter_step_and_the_optimizer_gives_up_in_the_end() {
    // Every period reports a blown-up loss: each is rejected (weights restored, the damping x10,
    // the step-length factor x0.1), and after `max_rejections` in a row the optimizer stops
    // changing the weights and says why.
    let capture = CaptureHandle::new();
    let mut optim = SngdConfig::new()
        .with_curvature(
            CurvatureConfig::new()
                .with_freq(2)
                .with_max_rejections(3)
                .with_damping(DampingConfig::new().with_initial(0.01).with_adaptive(true)),
        )
        .init::<TB>(&capture)
        .unwrap();
    let mut model = Mlp::<TB>::new(8, 16, 4, &capture);
    let (x, y) = mlp_problem(32, 8, 4);
    let loss_of = |m: &Mlp<TB>| cross_entropy(m.forward(x.clone()), y.clone());
    let mut before = None;
    let mut scales = Vec::new();
    let mut failed_at = None;
    // Every period is rejected, so the last kept weights are the initial ones.
    let initial = to_vec(model.l1.inner.weight.val().inner());
    for step in 0..20 {
        if optim.wants_loss_change() {
            let blown = Tensor::from_floats([f32::INFINITY], &Default::default());
            let model_now = model.clone();
            optim.observe_loss_change(&model_now, before.take().unwrap(), blown);
        }
        let loss = loss_of(&model);
        if optim.is_inversion_step(optim.steps()) {
            before = Some(loss.clone().inner());
        }
        let grads = capture.gradients(loss.backward(), &model);
        let weights_before = to_vec(model.l1.inner.weight.val().inner());
        match optim.try_step(0.1, model, grads) {
            Ok(next) => {
                assert!(failed_at.is_none(), "step {step} after giving up");
                model = next;
            }
            Err(GaveUp {
                module,
                error: TrainingError::Diverged { rejections, .. },
            }) => {
                assert_eq!(rejections, 3);
                let weights = to_vec(module.l1.inner.weight.val().inner());
                match failed_at {
                    // The step that gave up restored the last kept period's weights.
                    None => {
                        failed_at = Some(step);
                        assert_eq!(weights, initial, "step {step}");
                    }
                    // Nothing moves any more.
                    Some(_) => assert_eq!(weights, weights_before, "step {step}"),
                }
                model = module;
            }
        }
        if let Some(PeriodVerdict::Rejected { .. }) = optim.last_known().period {
            scales.push(optim.step_scale());
        }
    }
    // Each rejection cut the step tenfold, down to the factor's floor.
    let floor = StepLengthConfig::new().min;
    assert_eq!(scales.len(), 3, "{scales:?}");
    for (k, s) in scales.iter().enumerate() {
        assert!(
            (s - 0.1f64.powi(k as i32 + 1).max(floor)).abs() < 1e-12,
            "{scales:?}"
        );
    }
    assert!(failed_at.is_some());
    let message = optim.failure().unwrap().to_string();
    assert!(
        message.contains("3 curvature periods in a row"),
        "{message}"
    );
    let _ = model.valid();
}
