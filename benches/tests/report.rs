//! The report's inputs: layer shapes found from the models, the communication formula and the
//! state-memory accounting, checked by hand on small cases; one layer timed end to end.

use std::collections::HashMap;

use hylo_benches::comm::{comm_volume, state_memory};
use hylo_benches::layers::{model_layer_cases, resnet32_cases, time_layer};
use hylo_models::{Mlp, MlpConfig};

#[test]
fn resnet32_cases_cover_its_32_layers() {
    let cases = resnet32_cases();
    assert_eq!(cases.iter().map(|c| c.count).sum::<usize>(), 32);
    let fc = cases.iter().find(|c| c.shape == "linear 64->10").unwrap();
    assert_eq!((fc.d_in, fc.d_out, fc.count), (65, 10, 1));
    let stem = &cases[0];
    assert_eq!((stem.d_in, stem.d_out), (27, 16));
}

fn mlp_cases() -> Vec<hylo_benches::LayerCase> {
    model_layer_cases(
        |capture| {
            let m = MlpConfig::new(12, vec![5], 3).init(capture, &Default::default());
            (m, Box::new(|m: &Mlp<_>, x| m.forward_images(x)))
        },
        3,
        2,
    )
}

#[test]
fn communication_and_memory_follow_the_formulas() {
    // Layers: 12->5 (d_in' 13) and 5->3 (d_in' 6).
    let cases = mlp_cases();
    assert_eq!(cases.len(), 2);
    // b = 20, rho = 0.1: r = 2; P = 4: rP = 8.
    let v = comm_volume(&cases, 4, 20, 0.1);
    assert_eq!(v.kfac_bytes, 4 * (13 * 13 + 5 * 5 + 6 * 6 + 3 * 3));
    assert_eq!(v.hylo_bytes, 4 * (8 * (13 + 5) + 64 + 8 * (6 + 3) + 64));
    let m = state_memory(&cases, 83, 20, 0.1);
    assert_eq!(m.momentum, 4 * 83);
    assert_eq!(m.kfac, 4 * (2 * (169 + 25) + 18 + 2 * (36 + 9) + 9));
    assert_eq!(m.sngd, 4 * (20 * 18 + 400 + 20 * 9 + 400));
    assert_eq!(m.hylo, 4 * (2 * 18 + 4 + 2 * 9 + 4));
}

#[test]
fn a_layer_times_every_method() {
    let cases = resnet32_cases();
    let mut cache = HashMap::new();
    let t =
        time_layer::<burn::backend::Flex>(&cases[1], 8, 0.25, 1, &mut cache, &Default::default());
    for v in [
        t.kfac_factors,
        t.kfac_eigen,
        t.kfac_inverse,
        t.sngd,
        t.kid,
        t.kis,
        t.apply_kfac,
        t.apply_kfac_inverse,
        t.apply_sngd,
        t.apply_hylo,
    ] {
        assert!(v > 0.0 && v.is_finite());
    }
    assert_eq!(cache.len(), 1);
}

#[test]
fn step_timings_count_the_host_reads_of_each_step() {
    type B = burn::backend::Autodiff<burn::backend::Flex>;
    let freq = 2;
    let progress = indicatif::ProgressBar::hidden();
    let steps = hylo_benches::steps::resnet32_steps::<B>(2, freq, &Default::default(), &progress);
    assert_eq!(progress.position(), 5 + 3 * (freq as u64 + 1));
    let names: Vec<&str> = steps.iter().map(|s| s.optimizer.as_str()).collect();
    assert_eq!(names, ["sgd", "kfac", "sngd", "hylo"]);
    // ResNet-32 has 32 preconditioned layers; a refresh reads the NaN flag, then K-FAC both
    // factors of each layer, SNGD each kernel, HyLo the gradient norm and two matrices a layer.
    let expected = [0, 1 + 2 * 32, 1 + 32, 2 + 2 * 32];
    for (s, reads) in steps.iter().zip(expected) {
        assert_eq!(
            s.reads_plain_step, 0,
            "{}: a plain step read the device",
            s.optimizer
        );
        assert_eq!(s.reads_refresh_step, reads, "{}", s.optimizer);
        let amortised = (s.refresh_step + s.plain_step * (freq - 1) as f64) / freq as f64;
        assert!((s.amortised - amortised).abs() < 1e-12 && s.amortised > 0.0);
    }
}

#[test]
fn a_convergence_run_reaches_its_target_and_a_blown_up_one_counts_as_diverged() {
    use hylo_benches::convergence::{run, tasks, Setting};
    let dir = tempfile::tempdir().unwrap();
    let mlp = tasks(true).into_iter().find(|t| t.name == "mlp").unwrap();
    let good = run(
        &mlp,
        "sgd",
        &Setting::DEFAULTS,
        0,
        "cpu",
        &dir.path().join("a"),
    )
    .unwrap();
    // Well above chance (1/16; the initial weights depend on the tests running beside it), and
    // timed to the target exactly when it was reached.
    assert!(good.best > 0.3 && !good.diverged, "{good:?}");
    assert_eq!(
        good.time_to_target.is_some(),
        good.best >= mlp.target,
        "{good:?}"
    );
    // SGD at a learning rate of 1000 blows the loss up.
    let wild = Setting::lr(1000.0);
    let bad = run(&mlp, "sgd", &wild, 0, "cpu", &dir.path().join("b")).unwrap();
    assert!(bad.diverged && bad.time_to_target.is_none(), "{bad:?}");
}
