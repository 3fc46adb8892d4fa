//! The optimizers as Burn optimizers: wrappers, records, the NaN guard, and training.
#![allow(clippy::disallowed_methods)] // Tests and examples read the device freely.

mod common;

use burn::module::Module;
use burn::nn::conv::Conv2dConfig;
use burn::nn::{LinearConfig, PaddingConfig2d};
use burn::optim::{momentum::MomentumConfig, GradientsParams, Optimizer, SgdConfig};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::Tensor;
use common::models::*;
use common::*;
use hylo_optim::capture::{CaptureHandle, CapturedConv2d, CapturedLinear};
use hylo_optim::{
    CurvatureConfig, DampingConfig, Graft, HyloConfig, HyloMode, KfacConfig, NaturalGradient,
    SngdConfig, SwitchPolicy,
};

fn bytes<M: Module<TB>>(model: &M) -> Vec<u8> {
    BinBytesRecorder::<FullPrecisionSettings>::new()
        .record(model.clone().into_record(), ())
        .unwrap()
}

#[test]
fn wrappers_match_plain_layers_in_output_and_gradient() {
    let capture = CaptureHandle::new();
    let dev = device();
    let rng = rng_lock();
    // Burn initialises parameters lazily: materialise them before cloning.
    let linear = LinearConfig::new(5, 4).init::<TB>(&dev);
    let linear = linear.clone().load_record(linear.into_record());
    let wrapped = CapturedLinear::new(linear.clone(), &capture);
    let conv = Conv2dConfig::new([2, 3], [3, 3])
        .with_padding(PaddingConfig2d::Same)
        .init::<TB>(&dev);
    let conv = conv.clone().load_record(conv.into_record());
    let wrapped_conv = CapturedConv2d::new(conv.clone(), &capture).unwrap();
    drop(rng);
    let x = tensor::<TB, 3>(1, [2, 3, 5]);
    let img = tensor::<TB, 4>(2, [2, 2, 5, 5]);
    for armed in [false, true] {
        capture.arm(armed);
        let y_plain = linear.forward(x.clone());
        let y_wrap = wrapped.forward(x.clone());
        assert_eq!(to_vec(y_plain.clone()), to_vec(y_wrap.clone()));
        let z_plain = conv.forward(img.clone());
        let z_wrap = wrapped_conv.forward(img.clone());
        // The CPU convolution is computed as matrix products (hylo_optim::gemm_conv): the same
        // up to f32 rounding.
        let close = |a: Vec<f64>, b: Vec<f64>| assert!(rel_err(&a, &b) < 1e-5, "{a:?} {b:?}");
        close(to_vec(z_plain.clone()), to_vec(z_wrap.clone()));
        assert_eq!(capture.pending_len(), if armed { 2 } else { 0 });

        let g_plain = (y_plain.powi_scalar(2).sum() + z_plain.sin().sum()).backward();
        let g_wrap = (y_wrap.powi_scalar(2).sum() + z_wrap.sin().sum()).backward();
        capture.collect::<TB>(&g_wrap);
        let pairs = [(
            linear.weight.val().grad(&g_plain),
            wrapped.inner.weight.val().grad(&g_wrap),
        )];
        for (a, b) in pairs {
            assert_eq!(to_vec(a.unwrap()), to_vec(b.unwrap()));
        }
        close(
            to_vec(conv.weight.val().grad(&g_plain).unwrap()),
            to_vec(wrapped_conv.inner.weight.val().grad(&g_wrap).unwrap()),
        );
        close(
            to_vec(conv.bias.as_ref().unwrap().val().grad(&g_plain).unwrap()),
            to_vec(
                wrapped_conv
                    .inner
                    .bias
                    .as_ref()
                    .unwrap()
                    .val()
                    .grad(&g_wrap)
                    .unwrap(),
            ),
        );
        assert_eq!(capture.take::<IB>().len(), if armed { 2 } else { 0 });
    }
}

#[test]
fn grouped_convolution_is_a_clear_error() {
    let capture = CaptureHandle::new();
    let _rng = rng_lock();
    let conv = Conv2dConfig::new([4, 4], [3, 3])
        .with_groups(2)
        .init::<TB>(&device());
    let err = CapturedConv2d::new(conv, &capture).unwrap_err();
    assert!(err.to_string().contains("groups = 2"), "{err}");
}

#[test]
fn invalid_settings_name_the_field() {
    let capture = CaptureHandle::new();
    let bad = |r: Result<NaturalGradient<TB>, hylo_optim::error::ConfigError>, field: &str| {
        let msg = r.err().expect("must be rejected").to_string();
        assert!(msg.contains(field), "{msg}");
    };
    bad(HyloConfig::new().with_rho(0.0).init(&capture), "rho");
    bad(
        SngdConfig::new()
            .with_curvature(CurvatureConfig::new().with_freq(0))
            .init(&capture),
        "freq",
    );
    bad(
        SngdConfig::new()
            .with_curvature(
                CurvatureConfig::new().with_damping(DampingConfig::new().with_initial(f64::NAN)),
            )
            .init(&capture),
        "damping",
    );
    bad(
        KfacConfig::new()
            .with_curvature(CurvatureConfig::new().with_freq(3))
            .with_inverse_every(10)
            .init(&capture),
        "inverse_every",
    );
    bad(
        SngdConfig::new()
            .with_curvature(CurvatureConfig::new().with_momentum(1.5))
            .init(&capture),
        "momentum",
    );
}

fn curvature(freq: usize) -> CurvatureConfig {
    CurvatureConfig::new()
        .with_freq(freq)
        .with_weight_decay(1e-3)
        .with_damping(
            DampingConfig::new()
                .with_initial(1.0)
                .with_target(Some(0.1))
                .with_decay_refreshes(5),
        )
}

const NAMES: [&str; 4] = ["sngd", "kfac", "kfac-inverse", "hylo"];

/// Optimizer `name` reading curvature from `capture` (each test run needs its own handle: an
/// optimizer arms its handle for its own curvature steps).
fn optimizer(name: &str, capture: &CaptureHandle) -> NaturalGradient<TB> {
    optimizers(capture)
        .into_iter()
        .find(|(n, _)| *n == name)
        .expect("a known name")
        .1
}

fn optimizers(capture: &CaptureHandle) -> Vec<(&'static str, NaturalGradient<TB>)> {
    vec![
        (
            "sngd",
            SngdConfig::new()
                .with_curvature(curvature(2))
                .init(capture)
                .unwrap(),
        ),
        (
            "kfac",
            KfacConfig::new()
                .with_curvature(curvature(1).with_kl_clip(Some(0.01)))
                .with_inverse_every(2)
                .init(capture)
                .unwrap(),
        ),
        (
            "kfac-inverse",
            KfacConfig::new()
                .with_curvature(curvature(1))
                .with_inverse_every(2)
                .with_method(hylo_optim::KfacMethod::Inverse)
                .init(capture)
                .unwrap(),
        ),
        (
            "hylo",
            HyloConfig::new()
                .with_curvature(curvature(2))
                .with_rho(0.3)
                .with_switch(SwitchPolicy::Epochs {
                    a: 1,
                    b: 2,
                    c: 3,
                    steps_per_epoch: 2,
                })
                .init(capture)
                .unwrap(),
        ),
    ]
}

#[test]
fn record_round_trip_gives_the_same_next_step_bit_for_bit() {
    let (x, y) = cnn_problem(16);
    let loss_of = |m: &Cnn<TB>| cross_entropy(m.forward(x.clone()), y.clone());
    for prior_steps in [3, 4] {
        for name in NAMES {
            let capture = CaptureHandle::new();
            let mut optim = optimizer(name, &capture);
            let mut model = Cnn::<TB>::new(4, &capture);
            for _ in 0..prior_steps {
                model = step(model, &mut optim, &capture, 0.05, loss_of).0;
            }
            let recorder = BinBytesRecorder::<FullPrecisionSettings>::new();
            let saved = recorder
                .record(Optimizer::<Cnn<TB>, TB>::to_record(&optim), ())
                .unwrap();

            let (after_original, _) = step(model.clone(), &mut optim, &capture, 0.05, loss_of);
            let fresh = optimizer(name, &capture);
            let mut restored = Optimizer::<Cnn<TB>, TB>::load_record(
                fresh,
                recorder.load(saved, &device()).unwrap(),
            );
            assert_eq!(restored.steps(), prior_steps, "{name}");
            let (after_restored, _) = step(model, &mut restored, &capture, 0.05, loss_of);
            assert_eq!(
                bytes(&after_original),
                bytes(&after_restored),
                "{name} after {prior_steps} steps"
            );
        }
    }
}

#[test]
fn nan_gradient_leaves_the_weights_untouched() {
    let (x, y) = mlp_problem(16, 6, 3);
    for name in NAMES {
        let capture = CaptureHandle::new();
        let mut optim = optimizer(name, &capture);
        let model = Mlp::<TB>::new(6, 8, 3, &capture);
        let (model, _) = step(model, &mut optim, &capture, 0.1, |m: &Mlp<TB>| {
            cross_entropy(m.forward(x.clone()), y.clone())
        });
        let before = bytes(&model);
        let poisoned = x
            .clone()
            .slice_assign([0..1, 0..1], Tensor::from_floats([[f32::NAN]], &device()));
        let (after, _) = step(model, &mut optim, &capture, 0.1, |m: &Mlp<TB>| {
            cross_entropy(m.forward(poisoned.clone()), y.clone())
        });
        assert_eq!(
            before,
            bytes(&after),
            "{name}: weights changed on a NaN gradient"
        );
        let report = optim.last_report();
        assert!(report.skipped, "{name}");
        assert!(
            report.non_finite.iter().any(|p| p.contains("l1")),
            "{name}: {:?}",
            report.non_finite
        );
        // The skipped step counts for the schedules (as it does for the training loop), and the
        // device-side counters saw it.
        assert_eq!(optim.steps(), 2, "{name}");
        assert_eq!(optim.skipped_steps(), (1, 1), "{name}");
        // Training continues normally afterwards, with the momentum the NaN step did not touch.
        let (next, _) = step(after, &mut optim, &capture, 0.1, |m: &Mlp<TB>| {
            cross_entropy(m.forward(x.clone()), y.clone())
        });
        assert!(!optim.last_report().skipped);
        assert_ne!(before, bytes(&next));
        assert!(
            next_is_finite(&next),
            "{name}: NaN leaked into the weights or momentum"
        );
        assert_eq!(optim.skipped_steps(), (1, 0), "{name}");
    }
}

fn next_is_finite(model: &Mlp<TB>) -> bool {
    hylo_optim::comm::flatten_params::<TB, _>(model)
        .iter()
        .all(|v| v.is_finite())
}

fn train<M, O>(
    model: M,
    mut optim: O,
    capture: &CaptureHandle,
    lr: f64,
    steps: usize,
    loss_of: impl Fn(&M) -> Tensor<TB, 1> + Copy,
) -> f64
where
    M: burn::module::AutodiffModule<TB>,
    O: Optimizer<M, TB>,
{
    let mut model = model;
    for _ in 0..steps {
        model = step(model, &mut optim, capture, lr, loss_of).0;
    }
    loss_of(&model).into_scalar().into()
}

fn best_sgd<M: burn::module::AutodiffModule<TB>>(
    make: impl Fn(&CaptureHandle) -> M,
    steps: usize,
    loss_of: impl Fn(&M) -> Tensor<TB, 1> + Copy,
) -> f64 {
    [0.01, 0.03, 0.1, 0.3]
        .iter()
        .map(|&lr| {
            let capture = CaptureHandle::new();
            let sgd = SgdConfig::new()
                .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
                .init::<TB, M>();
            train(make(&capture), sgd, &capture, lr, steps, loss_of)
        })
        .filter(|l| l.is_finite())
        .fold(f64::INFINITY, f64::min)
}

#[test]
fn natural_gradient_beats_sgd_on_an_ill_conditioned_mlp() {
    let (x, y) = mlp_problem(64, 8, 4);
    let loss_of = |m: &Mlp<TB>| cross_entropy(m.forward(x.clone()), y.clone());
    let steps = 30;
    let sgd = best_sgd(|c| Mlp::new(8, 16, 4, c), steps, loss_of);
    let cfg = |damping: f64| {
        CurvatureConfig::new()
            .with_freq(1)
            .with_damping(DampingConfig::new().with_initial(damping))
            .with_graft(Graft::None)
    };
    let capture = CaptureHandle::new();
    let sngd_optim = SngdConfig::new()
        .with_curvature(cfg(0.3))
        .init::<TB>(&capture)
        .unwrap();
    let sngd = train(
        Mlp::new(8, 16, 4, &capture),
        sngd_optim,
        &capture,
        0.2,
        steps,
        loss_of,
    );
    let capture = CaptureHandle::new();
    let kfac_optim = KfacConfig::new()
        .with_curvature(cfg(0.1))
        .with_inverse_every(1)
        .init::<TB>(&capture)
        .unwrap();
    let kfac = train(
        Mlp::new(8, 16, 4, &capture),
        kfac_optim,
        &capture,
        0.1,
        steps,
        loss_of,
    );
    eprintln!("mlp: sgd {sgd:.4} sngd {sngd:.4} kfac {kfac:.4}");
    assert!(sngd < 0.8 * sgd, "SNGD {sngd} vs SGD {sgd}");
    assert!(kfac < 0.8 * sgd, "K-FAC {kfac} vs SGD {sgd}");
}

#[test]
fn natural_gradient_beats_sgd_on_a_small_cnn() {
    let (x, y) = cnn_problem_with(48, 1.0, 0.7);
    let loss_of = |m: &Cnn<TB>| cross_entropy(m.forward(x.clone()), y.clone());
    let steps = 15;
    let sgd = best_sgd(|c| Cnn::new(4, c), steps, loss_of);
    let cfg = CurvatureConfig::new()
        .with_freq(2)
        .with_damping(DampingConfig::new().with_initial(0.3))
        .with_graft(Graft::None);
    let capture = CaptureHandle::new();
    let sngd = train(
        Cnn::new(4, &capture),
        SngdConfig::new()
            .with_curvature(cfg.clone())
            .init::<TB>(&capture)
            .unwrap(),
        &capture,
        0.1,
        steps,
        loss_of,
    );
    let capture = CaptureHandle::new();
    let kfac = train(
        Cnn::new(4, &capture),
        KfacConfig::new()
            .with_curvature(cfg.clone())
            .with_inverse_every(2)
            .init::<TB>(&capture)
            .unwrap(),
        &capture,
        0.1,
        steps,
        loss_of,
    );
    let capture = CaptureHandle::new();
    let hylo_optim = HyloConfig::new()
        .with_curvature(cfg)
        .with_rho(0.25)
        .init::<TB>(&capture)
        .unwrap();
    let hylo = train(
        Cnn::new(4, &capture),
        hylo_optim,
        &capture,
        0.1,
        steps,
        loss_of,
    );
    eprintln!("cnn: sgd {sgd:.4} sngd {sngd:.4} kfac {kfac:.4} hylo {hylo:.4}");
    assert!(sngd < 0.5 * sgd, "SNGD {sngd} vs SGD {sgd}");
    assert!(kfac < 0.5 * sgd, "K-FAC {kfac} vs SGD {sgd}");
    assert!(hylo < 0.5 * sgd, "HyLo {hylo} vs SGD {sgd}");
}

#[test]
fn hylo_reports_its_mode_and_switches_by_epoch() {
    let (x, y) = mlp_problem(32, 6, 3);
    let capture = CaptureHandle::new();
    let mut optim = HyloConfig::new()
        .with_curvature(CurvatureConfig::new().with_freq(1))
        .with_switch(SwitchPolicy::Epochs {
            a: 1,
            b: 2,
            c: 3,
            steps_per_epoch: 2,
        })
        .init::<TB>(&capture)
        .unwrap();
    let mut model = Mlp::<TB>::new(6, 8, 3, &capture);
    let mut modes = Vec::new();
    for _ in 0..10 {
        model = step(model, &mut optim, &capture, 0.05, |m: &Mlp<TB>| {
            cross_entropy(m.forward(x.clone()), y.clone())
        })
        .0;
        assert!(optim.last_report().refreshed);
        modes.push(optim.mode().unwrap());
    }
    use HyloMode::{Kid, Kis};
    // epochs 0,0,1,1,2,2,3,3,4,4: KID in epoch 0 and in epoch 3.
    assert_eq!(
        modes,
        vec![Kid, Kid, Kis, Kis, Kis, Kis, Kid, Kid, Kis, Kis]
    );
}

#[test]
fn refresh_happens_every_freq_steps_and_damping_decays() {
    let (x, y) = mlp_problem(16, 6, 3);
    let capture = CaptureHandle::new();
    let mut optim = SngdConfig::new()
        .with_curvature(curvature(3))
        .init::<TB>(&capture)
        .unwrap();
    let mut model = Mlp::<TB>::new(6, 8, 3, &capture);
    let mut refreshed = Vec::new();
    let mut damping = Vec::new();
    for _ in 0..7 {
        model = step(model, &mut optim, &capture, 0.05, |m: &Mlp<TB>| {
            cross_entropy(m.forward(x.clone()), y.clone())
        })
        .0;
        refreshed.push(optim.last_report().refreshed);
        damping.push(optim.damping());
    }
    assert_eq!(
        refreshed,
        vec![true, false, false, true, false, false, true]
    );
    assert!(damping[0] == 1.0 && damping[3] < damping[0] && damping[6] < damping[3]);
    assert_eq!(optim.layers().count(), 2);
}

#[test]
fn unwrapped_parameters_get_plain_sgd_with_momentum() {
    // A model with no captured layers: the natural-gradient optimizer is exactly SGD + momentum.
    let (x, y) = mlp_problem(16, 6, 3);
    let capture = CaptureHandle::new();
    let never = CaptureHandle::new(); // wrappers see a handle the optimizer never arms
    let model = Mlp::<TB>::new(6, 8, 3, &never);
    let model = model.clone().load_record(model.into_record());
    let loss_of = |m: &Mlp<TB>| cross_entropy(m.forward(x.clone()), y.clone());
    let mut ours = SngdConfig::new()
        .with_curvature(
            CurvatureConfig::new()
                .with_momentum(0.9)
                .with_weight_decay(0.01),
        )
        .init::<TB>(&capture)
        .unwrap();
    let mut sgd = SgdConfig::new()
        .with_momentum(Some(
            MomentumConfig::new().with_momentum(0.9).with_dampening(0.0),
        ))
        .with_weight_decay(Some(burn::optim::decay::WeightDecayConfig::new(0.01)))
        .init::<TB, Mlp<TB>>();
    let (mut a, mut b) = (model.clone(), model);
    for _ in 0..3 {
        let ga = GradientsParams::from_grads(loss_of(&a).backward(), &a);
        a = ours.step(0.1, a, ga);
        let gb = GradientsParams::from_grads(loss_of(&b).backward(), &b);
        b = sgd.step(0.1, b, gb);
    }
    let (va, vb) = (
        to_vec(a.l1.inner.weight.val()),
        to_vec(b.l1.inner.weight.val()),
    );
    assert!(rel_err(&va, &vb) < 1e-6);
}

#[test]
fn grafting_gives_every_layer_sgds_step_length_in_its_own_direction() {
    // No momentum or weight decay: each preconditioned layer (weight and bias) moves by exactly
    // lr |g| along its natural-gradient direction, which is not g's, for every method.
    let (x, y) = mlp_problem(32, 8, 4);
    let lr = 0.05;
    for name in ["sngd", "kfac", "hylo"] {
        let capture = CaptureHandle::new();
        let model = Mlp::<TB>::new(8, 16, 4, &capture);
        let c = CurvatureConfig::new()
            .with_freq(1)
            .with_momentum(0.0)
            .with_damping(DampingConfig::new().with_initial(0.1));
        assert_eq!(c.graft, Graft::Sgd, "grafting is the default");
        let mut optim = match name {
            "sngd" => SngdConfig::new().with_curvature(c).init::<TB>(&capture),
            "kfac" => KfacConfig::new()
                .with_curvature(c)
                .with_inverse_every(1)
                .init(&capture),
            _ => HyloConfig::new().with_curvature(c).init(&capture),
        }
        .unwrap();
        let loss = cross_entropy(model.forward(x.clone()), y.clone());
        let grads = capture.gradients(loss.backward(), &model);
        // Each layer's block: weight and bias, flattened.
        let block = |l: &CapturedLinear<TB>| {
            let mut v = to_vec(l.inner.weight.val().inner());
            v.extend(to_vec(l.inner.bias.as_ref().unwrap().val().inner()));
            v
        };
        let gradient = |l: &CapturedLinear<TB>| {
            let mut v = to_vec(grads.get::<IB, 2>(l.inner.weight.id).unwrap());
            v.extend(to_vec(
                grads
                    .get::<IB, 1>(l.inner.bias.as_ref().unwrap().id)
                    .unwrap(),
            ));
            v
        };
        let before = [block(&model.l1), block(&model.l2)];
        let g = [gradient(&model.l1), gradient(&model.l2)];
        let after = optim.step(lr, model.clone(), grads);
        let now = [block(&after.l1), block(&after.l2)];
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        for k in 0..2 {
            let step: Vec<f64> = before[k].iter().zip(&now[k]).map(|(b, a)| b - a).collect();
            let length = norm(&step) / (lr * norm(&g[k]));
            assert!(
                (length - 1.0).abs() < 1e-4,
                "{name} layer {k}: |step| / lr|g| = {length}"
            );
            let cos = step.iter().zip(&g[k]).map(|(s, g)| s * g).sum::<f64>()
                / (norm(&step) * norm(&g[k]));
            assert!(cos > 0.0 && cos < 0.999, "{name} layer {k}: cos {cos}");
        }
    }
}
