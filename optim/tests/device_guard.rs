//! What a step reads from the device, and the device-side decisions that replace host reads:
//! the NaN guard, the fallback of a non-finite direction, a failed refresh, and KL clipping.
#![allow(clippy::disallowed_methods)] // Tests and examples read the device freely.

mod common;

use burn::module::Module;
use burn::optim::Optimizer;
use burn::tensor::{Tensor, TensorData};
use common::models::*;
use common::*;
use hylo_optim::{
    host, CaptureHandle, CurvatureConfig, DampingConfig, Graft, HyloConfig, KfacConfig,
    NaturalGradient, SngdConfig, SwitchPolicy,
};

fn config(freq: usize) -> CurvatureConfig {
    CurvatureConfig::new()
        .with_freq(freq)
        .with_momentum(0.0)
        .with_damping(DampingConfig::new().with_initial(0.5))
        // The direction itself (its fallback is g / lambda), not SGD's step size.
        .with_graft(Graft::None)
}

/// Host reads of each of `steps` optimizer steps (the training loop's own reads not counted).
fn reads_per_step(
    optim: &mut NaturalGradient<TB>,
    capture: &CaptureHandle,
    steps: usize,
) -> Vec<u64> {
    let (x, y) = cnn_problem(16);
    let mut model = Cnn::<TB>::new(4, capture);
    (0..steps)
        .map(|_| {
            let loss = cross_entropy(model.forward(x.clone()), y.clone());
            let grads = capture.gradients(loss.backward(), &model);
            let before = host::reads();
            model = optim.step(0.05, model.clone(), grads);
            host::reads() - before
        })
        .collect()
}

#[test]
fn steps_between_refreshes_read_nothing_from_the_device() {
    // The CNN has three preconditioned layers; curvature every 3 steps.
    let layers = 3;
    let capture = CaptureHandle::new();
    let cfg = config(3).with_kl_clip(Some(1e-3));
    let mut sngd = SngdConfig::new()
        .with_curvature(cfg.clone())
        .init(&capture)
        .unwrap();
    // SNGD: the gradients' NaN flag, then one n x n kernel per layer at a refresh.
    assert_eq!(
        reads_per_step(&mut sngd, &capture, 7),
        vec![1 + layers, 0, 0, 1 + layers, 0, 0, 1 + layers]
    );
    for (switch, per_layer) in [(SwitchPolicy::Kis, 2), (SwitchPolicy::Kid, 2)] {
        let capture = CaptureHandle::new();
        let mut hylo = HyloConfig::new()
            .with_curvature(cfg.clone())
            .with_rho(0.5)
            .with_switch(switch.clone())
            .init(&capture)
            .unwrap();
        // HyLo: the NaN flag, the gradient norm, then per layer KIS's sampling weights or KID's
        // local kernel, and the kernel of the kept rows.
        let refresh = 2 + per_layer * layers;
        assert_eq!(
            reads_per_step(&mut hylo, &capture, 4),
            vec![refresh, 0, 0, refresh],
            "{switch:?}"
        );
    }
    let capture = CaptureHandle::new();
    let mut kfac = KfacConfig::new()
        .with_curvature(cfg)
        .with_inverse_every(6)
        .init(&capture)
        .unwrap();
    // K-FAC: the NaN flag at every factor update; factors stay on the device, and an
    // inversion reads both factors of every layer.
    assert_eq!(
        reads_per_step(&mut kfac, &capture, 7),
        vec![1 + 2 * layers, 0, 0, 1, 0, 0, 1 + 2 * layers]
    );
    // Reading the report is a separate, single read.
    let before = host::reads();
    assert!(!kfac.last_report().skipped);
    let _ = kfac.last_report();
    assert_eq!(host::reads() - before, 1);
}

fn weights<M: Module<TB>>(model: &M) -> Vec<f64> {
    hylo_optim::comm::flatten_params::<TB, _>(model)
        .into_iter()
        .map(f64::from)
        .collect()
}

#[test]
fn a_non_finite_direction_falls_back_to_the_damped_identity() {
    let (x, y) = mlp_problem(16, 6, 3);
    let capture = CaptureHandle::new();
    let mut optim = SngdConfig::new()
        .with_curvature(config(1000))
        .init::<TB>(&capture)
        .unwrap();
    let loss_of = |m: &Mlp<TB>| cross_entropy(m.forward(x.clone()), y.clone());
    let (model, _) = step(
        Mlp::<TB>::new(6, 8, 3, &capture),
        &mut optim,
        &capture,
        0.1,
        loss_of,
    );
    // Poison the first layer's middle matrix M, as a bad factorisation would.
    let mut record = Optimizer::<Mlp<TB>, TB>::to_record(&optim);
    let layer = record
        .layers
        .iter_mut()
        .find(|l| l.weight_id == model.l1.inner.weight.id.val())
        .unwrap();
    let m = layer.tensors.pop().unwrap();
    let [r, c] = m.dims();
    layer.tensors.push(Tensor::from_data(
        TensorData::new(vec![f32::NAN; r * c], [r, c]),
        &device(),
    ));
    let fresh = SngdConfig::new()
        .with_curvature(config(1000))
        .init::<TB>(&capture)
        .unwrap();
    let mut optim = Optimizer::<Mlp<TB>, TB>::load_record(fresh, record);

    let grads = loss_of(&model).backward();
    let g = to_vec(model.l1.inner.weight.val().grad(&grads).unwrap());
    let before = to_vec(model.l1.inner.weight.val());
    let (after, _) = step(model, &mut optim, &capture, 0.1, loss_of);
    let moved: Vec<f64> = before
        .iter()
        .zip(to_vec(after.l1.inner.weight.val()))
        .map(|(b, a)| (b - a) / 0.1)
        .collect();
    // Momentum 0, no weight decay: the update of l1 is lr * g / lambda.
    let expected: Vec<f64> = g.iter().map(|v| v / 0.5).collect();
    assert!(
        rel_err(&moved, &expected) < 1e-5,
        "{}",
        rel_err(&moved, &expected)
    );
    assert!(weights(&after).iter().all(|v| v.is_finite()));
    let report = optim.last_report();
    assert!(!report.skipped);
    assert_eq!(report.fallbacks.len(), 1, "{report:?}");
    assert!(report.fallbacks[0].0.contains("l1"), "{report:?}");
}

/// The tensors of layer `weight` in the optimizer's record.
fn layer_state(o: &NaturalGradient<TB>, weight: u64) -> Vec<Vec<f64>> {
    Optimizer::<Mlp<TB>, TB>::to_record(o)
        .layers
        .into_iter()
        .filter(|l| l.weight_id == weight)
        .flat_map(|l| l.tensors.into_iter().map(to_vec))
        .collect()
}

/// SNGD and K-FAC, each with its own capture handle.
fn sngd_and_kfac() -> Vec<(&'static str, NaturalGradient<TB>, CaptureHandle)> {
    let (a, b) = (CaptureHandle::new(), CaptureHandle::new());
    vec![
        (
            "sngd",
            SngdConfig::new()
                .with_curvature(config(2))
                .init::<TB>(&a)
                .unwrap(),
            a,
        ),
        (
            "kfac",
            KfacConfig::new()
                .with_curvature(config(2))
                .with_inverse_every(2)
                .init::<TB>(&b)
                .unwrap(),
            b,
        ),
    ]
}

#[test]
fn a_nan_batch_on_a_curvature_step_leaves_the_curvature_alone() {
    let (x, y) = mlp_problem(16, 6, 3);
    let poisoned = x
        .clone()
        .slice_assign([0..1, 0..1], Tensor::from_floats([[f32::NAN]], &device()));
    for (name, mut optim, capture) in sngd_and_kfac() {
        let good = |m: &Mlp<TB>| cross_entropy(m.forward(x.clone()), y.clone());
        let bad = |m: &Mlp<TB>| cross_entropy(m.forward(poisoned.clone()), y.clone());
        let mut model = Mlp::<TB>::new(6, 8, 3, &capture);
        for _ in 0..2 {
            model = step(model, &mut optim, &capture, 0.1, good).0;
        }
        let ids = [
            model.l1.inner.weight.id.val(),
            model.l2.inner.weight.id.val(),
        ];
        let kept: Vec<_> = ids.iter().map(|&id| layer_state(&optim, id)).collect();
        let damping = optim.damping();
        let before = weights(&model);
        // Step 2 is a curvature step, on a batch holding a NaN: nothing changes.
        model = step(model, &mut optim, &capture, 0.1, bad).0;
        let report = optim.last_report().clone();
        assert!(report.skipped && !report.refreshed, "{name}: {report:?}");
        assert_eq!(weights(&model), before, "{name}");
        let now: Vec<_> = ids.iter().map(|&id| layer_state(&optim, id)).collect();
        assert_eq!(now, kept, "{name}: the curvature changed");
        assert_eq!(optim.damping(), damping, "{name}");
        // The next good step trains with it.
        model = step(model, &mut optim, &capture, 0.1, good).0;
        assert_ne!(weights(&model), before, "{name}");
        assert!(weights(&model).iter().all(|v| v.is_finite()), "{name}");
    }
}

#[test]
fn a_failed_refresh_keeps_the_last_good_curvature() {
    let (x, y) = mlp_problem(16, 6, 3);
    // Inputs of 1e20: the gradients stay finite (the loss saturates) but the first layer's
    // kernel (SNGD) or input factor (K-FAC) overflows f32, so its refresh fails.
    let huge = x.clone() * 1e20;
    for (name, mut optim, capture) in sngd_and_kfac() {
        let good = |m: &Mlp<TB>| cross_entropy(m.forward(x.clone()), y.clone());
        let overflow = |m: &Mlp<TB>| cross_entropy(m.forward(huge.clone()), y.clone());
        let mut model = Mlp::<TB>::new(6, 8, 3, &capture);
        for _ in 0..2 {
            model = step(model, &mut optim, &capture, 0.01, good).0;
        }
        let l1 = model.l1.inner.weight.id.val();
        let kept = layer_state(&optim, l1);
        model = step(model, &mut optim, &capture, 1e-30, overflow).0;
        let report = optim.last_report().clone();
        assert!(report.refreshed && !report.skipped, "{name}: {report:?}");
        if name == "sngd" {
            assert!(
                report
                    .fallbacks
                    .iter()
                    .any(|(layer, _)| layer.contains("l1")),
                "{name}: {report:?}"
            );
            assert_eq!(
                layer_state(&optim, l1),
                kept,
                "{name}: l1's curvature changed"
            );
        } else {
            // K-FAC folds nothing non-finite into the running average of A: the
            // eigendecomposition of the kept average succeeds.
            assert_eq!(layer_state(&optim, l1)[0], kept[0], "{name}: A took Inf");
        }
        assert!(weights(&model).iter().all(|v| v.is_finite()), "{name}");
    }
}

#[test]
fn kl_clipping_bounds_the_update() {
    let (x, y) = mlp_problem(32, 6, 3);
    let loss_of = |m: &Mlp<TB>| cross_entropy(m.forward(x.clone()), y.clone());
    let lr = 0.5;
    let kappa = 1e-4;
    let run = |kl: Option<f64>| {
        let capture = CaptureHandle::new();
        let mut optim = SngdConfig::new()
            .with_curvature(config(1).with_kl_clip(kl))
            .init::<TB>(&capture)
            .unwrap();
        let model = Mlp::<TB>::new(6, 8, 3, &capture);
        let grads = loss_of(&model).backward();
        let g: Vec<f64> = [&model.l1, &model.l2]
            .iter()
            .flat_map(|l| {
                let mut v = to_vec(l.inner.weight.val().grad(&grads).unwrap());
                v.extend(to_vec(
                    l.inner.bias.as_ref().unwrap().val().grad(&grads).unwrap(),
                ));
                v
            })
            .collect();
        let before = [&model.l1, &model.l2]
            .iter()
            .flat_map(|l| {
                let mut v = to_vec(l.inner.weight.val());
                v.extend(to_vec(l.inner.bias.as_ref().unwrap().val()));
                v
            })
            .collect::<Vec<_>>();
        let (after, _) = step(model, &mut optim, &capture, lr, loss_of);
        let now: Vec<f64> = [&after.l1, &after.l2]
            .iter()
            .flat_map(|l| {
                let mut v = to_vec(l.inner.weight.val());
                v.extend(to_vec(l.inner.bias.as_ref().unwrap().val()));
                v
            })
            .collect();
        let u: Vec<f64> = before.iter().zip(&now).map(|(b, a)| (b - a) / lr).collect();
        (u, g, optim.last_report().kl_scale)
    };
    let (v, g, none) = run(None);
    assert_eq!(none, None);
    let (u, _, scale) = run(Some(kappa));
    let nu = scale.expect("clipping reports its scale");
    let vg: f64 = v.iter().zip(&g).map(|(a, b)| a * b).sum();
    assert!(
        lr * lr * vg > kappa,
        "the test needs a step that clipping shrinks"
    );
    // nu = sqrt(kappa / (lr^2 <v, g>)) < 1, the clipped update is nu v, and its quadratic
    // KL estimate lr^2 nu^2 <v, g> equals kappa.
    let expected = (kappa / (lr * lr * vg)).sqrt();
    assert!(
        (nu - expected).abs() < 1e-4 * expected,
        "{nu} vs {expected}"
    );
    let scaled: Vec<f64> = v.iter().map(|x| x * nu).collect();
    assert!(rel_err(&u, &scaled) < 1e-4);
    let kl: f64 = lr
        * lr
        * u.iter()
            .zip(&v)
            .zip(&g)
            .map(|((a, _), c)| a * c)
            .sum::<f64>()
        * nu;
    assert!((kl - kappa).abs() < 1e-3 * kappa, "{kl} vs {kappa}");
    // A generous bound leaves the step alone.
    let (w, _, loose) = run(Some(1e6));
    assert_eq!(loose, Some(1.0));
    assert_eq!(w, v);
}

#[derive(Module, Debug)]
struct BnNet<B: burn::tensor::backend::Backend> {
    conv: hylo_optim::CapturedConv2d<B>,
    bn: burn::nn::BatchNorm<B>,
    fc: hylo_optim::CapturedLinear<B>,
}

impl BnNet<TB> {
    fn new(capture: &CaptureHandle) -> Self {
        let _rng = rng_lock();
        let dev = device();
        <TB as burn::tensor::backend::Backend>::seed(&dev, 5);
        materialised(Self {
            conv: hylo_optim::CapturedConv2d::from_config(
                &burn::nn::conv::Conv2dConfig::new([1, 4], [3, 3])
                    .with_padding(burn::nn::PaddingConfig2d::Explicit(1, 1, 1, 1)),
                capture,
                &dev,
            )
            .unwrap(),
            bn: burn::nn::BatchNormConfig::new(4).init(&dev),
            fc: hylo_optim::CapturedLinear::from_config(
                &burn::nn::LinearConfig::new(4 * 64, 4),
                capture,
                &dev,
            ),
        })
    }

    fn forward(&self, x: Tensor<TB, 4>) -> Tensor<TB, 2> {
        let h = burn::tensor::activation::relu(self.bn.forward(self.conv.forward(x)));
        let [n, c, hh, ww] = h.dims();
        self.fc.forward(h.reshape([n, c * hh * ww]))
    }
}

/// Every float of the model's record, BatchNorm statistics included (a record synchronises them).
fn everything(model: &BnNet<TB>) -> Vec<f64> {
    let bytes = burn::record::BinBytesRecorder::<burn::record::FullPrecisionSettings>::new();
    let saved =
        burn::record::Recorder::<TB>::record(&bytes, model.clone().into_record(), ()).unwrap();
    let copy = BnNet::new(&CaptureHandle::new())
        .load_record(burn::record::Recorder::<TB>::load(&bytes, saved, &device()).unwrap());
    let mut out = weights(&copy);
    out.extend(to_vec(copy.bn.running_mean.value()));
    out.extend(to_vec(copy.bn.running_var.value()));
    out
}

#[test]
fn a_skipped_step_also_undoes_the_batch_norm_statistics() {
    let (x, y) = cnn_problem(16);
    let poisoned = x.clone().slice_assign(
        [0..1, 0..1, 0..1, 0..1],
        Tensor::full([1, 1, 1, 1], f32::NAN, &device()),
    );
    let capture = CaptureHandle::new();
    let mut optim = SngdConfig::new()
        .with_curvature(config(2))
        .init::<TB>(&capture)
        .unwrap();
    let good = |m: &BnNet<TB>| cross_entropy(m.forward(x.clone()), y.clone());
    let bad = |m: &BnNet<TB>| cross_entropy(m.forward(poisoned.clone()), y.clone());
    let mut model = BnNet::new(&capture);
    for _ in 0..3 {
        model = step(model, &mut optim, &capture, 0.1, good).0;
    }
    let before = everything(&model);
    assert!(before.iter().all(|v| v.is_finite()));
    // A plain step (3) and a refresh step (4) on the poisoned batch.
    for _ in 0..2 {
        model = step(model, &mut optim, &capture, 0.1, bad).0;
        assert!(optim.last_report().skipped);
        let now = everything(&model);
        assert_eq!(now, before, "the NaN batch left a trace");
    }
    model = step(model, &mut optim, &capture, 0.1, good).0;
    let after = everything(&model);
    assert_ne!(after, before);
    assert!(after.iter().all(|v| v.is_finite()));
}
