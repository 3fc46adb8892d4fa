//! Adaptive damping (Levenberg-Marquardt on the reduction ratio): started from a damping 100x too
//! small, where the same damping held fixed diverges, it recovers and trains.

mod common;

use burn::module::AutodiffModule;
use common::models::*;
use common::*;
use hylo_optim::{CaptureHandle, CurvatureConfig, DampingConfig, NaturalGradient, SngdConfig};

fn optimizer(
    damping: DampingConfig,
    freq: usize,
    momentum: f64,
    capture: &CaptureHandle,
) -> NaturalGradient<TB> {
    SngdConfig::new()
        .with_curvature(
            CurvatureConfig::new()
                .with_freq(freq)
                .with_momentum(momentum)
                .with_damping(damping),
        )
        .init(capture)
        .unwrap()
}

/// Losses and dampings of `steps` steps on the ill-conditioned MLP problem (full batch); before
/// each refresh the loop reports the loss change since the last one, as `hylo-train` does.
fn train(
    damping: DampingConfig,
    freq: usize,
    momentum: f64,
    lr: f64,
    steps: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (x, y) = mlp_problem(64, 8, 4);
    let capture = CaptureHandle::new();
    let mut optim = optimizer(damping, freq, momentum, &capture);
    let mut model = Mlp::<TB>::new(8, 16, 4, &capture);
    let loss_of = burn::nn::loss::CrossEntropyLossConfig::new().init(&Default::default());
    let mut losses = Vec::new();
    let mut dampings = Vec::new();
    let mut refresh_loss = None;
    for _ in 0..steps {
        if optim.wants_loss_change() {
            // The last refresh batch (here: the same full batch) at the current weights.
            let after =
                loss_of.forward(model.valid().forward(x.clone().inner()), y.clone().inner());
            optim.observe_loss_change(&model, refresh_loss.take().unwrap(), after);
        }
        let refreshing = optim.is_curvature_step(optim.steps());
        let loss = cross_entropy(model.forward(x.clone()), y.clone());
        losses.push(loss.clone().into_scalar() as f64);
        if refreshing {
            refresh_loss = Some(loss.clone().inner());
        }
        let grads = capture.gradients(loss.backward(), &model);
        model = burn::optim::Optimizer::step(&mut optim, lr, model, grads);
        dampings.push(optim.damping());
    }
    (losses, dampings)
}

#[test]
fn adaptive_damping_recovers_from_a_damping_far_too_small() {
    // Curvature refreshed every step, no momentum: the setting where the damping alone decides.
    let (freq, momentum, lr, steps) = (1, 0.0, 0.5, 60);
    let good = 0.3;
    let small = good / 100.0;
    let (fixed_good, _) = train(
        DampingConfig::new().with_initial(good),
        freq,
        momentum,
        lr,
        steps,
    );
    let (fixed_small, _) = train(
        DampingConfig::new().with_initial(small),
        freq,
        momentum,
        lr,
        steps,
    );
    let (adaptive, dampings) = train(
        DampingConfig::new().with_initial(small).with_adaptive(true),
        freq,
        momentum,
        lr,
        steps,
    );
    let initial = fixed_good[0];
    // The setting is sound with the right damping and diverges with 1/100 of it...
    assert!(fixed_good[steps - 1] < 0.5 * initial, "{fixed_good:?}");
    assert!(
        fixed_small.iter().any(|l| !l.is_finite() || *l > 1e3),
        "{fixed_small:?}"
    );
    // ... from which the adaptive rule recovers: it raises the damping, the loss never runs away
    // and training ends as well as with the right fixed damping.
    assert!(
        adaptive
            .iter()
            .all(|l| l.is_finite() && *l < 10.0 * initial),
        "{adaptive:?}"
    );
    assert!(
        dampings.iter().cloned().fold(0.0, f64::max) > 10.0 * small,
        "{dampings:?}"
    );
    assert!(
        adaptive[steps - 1] < fixed_good[steps - 1] * 1.1,
        "{:?} vs {:?}",
        adaptive[steps - 1],
        fixed_good[steps - 1]
    );
}

#[test]
fn the_reduction_ratio_is_read_only_at_refreshes() {
    // Adaptive damping adds no host read between refreshes.
    let (x, y) = mlp_problem(16, 8, 4);
    let capture = CaptureHandle::new();
    let mut optim = SngdConfig::new()
        .with_curvature(
            CurvatureConfig::new()
                .with_freq(3)
                .with_damping(DampingConfig::new().with_adaptive(true)),
        )
        .init::<TB>(&capture)
        .unwrap();
    let mut model = Mlp::<TB>::new(8, 16, 4, &capture);
    let mut refresh_loss = None;
    for step in 0..7 {
        assert_eq!(
            optim.wants_loss_change(),
            step % 3 == 0 && step > 0,
            "step {step}"
        );
        if optim.wants_loss_change() {
            let after = cross_entropy(model.forward(x.clone()), y.clone()).inner();
            optim.observe_loss_change(&model, refresh_loss.take().unwrap(), after);
        }
        let loss = cross_entropy(model.forward(x.clone()), y.clone());
        if step % 3 == 0 {
            refresh_loss = Some(loss.clone().inner());
        }
        let grads = capture.gradients(loss.backward(), &model);
        let reads = hylo_optim::host::reads();
        model = burn::optim::Optimizer::step(&mut optim, 0.1, model, grads);
        let reads = hylo_optim::host::reads() - reads;
        if step % 3 == 0 {
            // The NaN flag, two kernels, and (after the first period) the last ratio.
            assert_eq!(reads, 3 + u64::from(step > 0), "step {step}");
        } else {
            assert_eq!(reads, 0, "step {step}");
        }
    }
}
