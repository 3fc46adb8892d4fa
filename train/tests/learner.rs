//! HyLo in burn-train's `Learner` (the `learner` example): with its default recipe (grafting,
//! adaptive damping through `CaptureHandle::gradients_with_loss`) it trains as `hylo-train` does
//! on the same data and seed; checkpoints hold the optimizer's state, and a run resumed from one
//! continues as if it had never stopped (fixed damping) or restarts the open curvature period
//! (adaptive damping).

#[path = "../examples/learner.rs"]
mod learner;

use burn::backend::Flex;
use burn::module::Module;
use hylo_models::{Classifier, ClassifierSpec, ModelName};
use hylo_optim::CaptureHandle;
use hylo_train::app::{run_training, Cli, Command};
use hylo_train::optimizers::CheckpointRecorder;

use clap::Parser;

/// The runs seed Burn's process-wide RNG and draw their weights from it: tests that run in
/// parallel threads take turns, or one would draw between the other's seed and its weights.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn the_learner_trains_with_the_default_recipe_as_hylo_train_does() {
    let _turn = one_at_a_time();
    let settings = learner::Settings {
        epochs: 1,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let with_learner = learner::run(&dir.path().join("learner"), &settings, None);
    // 256 samples in batches of 32: 8 steps; curvature every 4; adaptive damping judged at 4.
    assert_eq!(with_learner.reports.len(), 8);
    assert!(
        with_learner.reports[4].period.is_some(),
        "{:?}",
        with_learner.reports[4]
    );
    let out = dir.path().join("hylo-train");
    let line = format!(
        "hylo-train classify --model resnet20 --dataset synthetic --channels 3 --image-size 8 \
         --train-samples 256 --val-samples 64 --batch-size 32 --epochs 1 --freq 4 --lr 0.1 \
         --optim hylo --seed 0 --bn-recalibrate 0 --out {}",
        out.display()
    );
    // (`--bn-recalibrate 0`: hylo-train's recalibration before validation rewrites the running
    // statistics it saves, which the Learner's validation keeps as training left them.)
    let Some(Command::Classify(cmd)) = Cli::try_parse_from(line.split_whitespace())
        .unwrap()
        .command
    else {
        unreachable!()
    };
    run_training("classify", cmd).unwrap();
    let (train, _) = learner::data(&settings);
    let spec = ClassifierSpec::new(3, 8, hylo_datasets::SampleSource::classes(&train));
    let trained = Classifier::<Flex>::build(
        ModelName::CifarResNet(20),
        &spec,
        &CaptureHandle::new(),
        &Default::default(),
    )
    .unwrap()
    .load_file(
        out.join("checkpoint/model"),
        &CheckpointRecorder::new(),
        &Default::default(),
    )
    .unwrap();
    let with_binary = hylo_optim::comm::flatten_params::<Flex, _>(&trained);
    assert_eq!(with_learner.weights.len(), with_binary.len());
    let differing = with_learner
        .weights
        .iter()
        .zip(&with_binary)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differing, 0,
        "the Learner trained differently from hylo-train"
    );
}

#[test]
fn the_learner_refreshes_curvature_and_resumes_with_the_same_optimizer_state() {
    let _turn = one_at_a_time();
    let fixed = learner::Settings {
        fixed_damping: Some(0.3),
        ..Default::default()
    };
    let whole_dir = tempfile::tempdir().unwrap();
    let whole = learner::run(whole_dir.path(), &fixed, None);
    assert_eq!(whole.reports.len(), 24);
    for (i, r) in whole.reports.iter().enumerate() {
        assert_eq!(r.step, i);
        assert_eq!(r.refreshed, i % 4 == 0, "step {i}: {r:?}");
        assert!(!r.skipped && r.fallbacks.is_empty(), "step {i}: {r:?}");
        assert!(r.refreshed == r.mode.is_some() || i > 0);
    }
    for file in ["model-3.mpk", "optim-3.mpk", "scheduler-3.mpk"] {
        assert!(
            whole_dir.path().join("checkpoint").join(file).is_file(),
            "{file}"
        );
    }
    // One epoch, then a new Learner resumed from its checkpoint for the other two: with a
    // fixed damping the resumed run is the uninterrupted one, bit for bit.
    let split_dir = tempfile::tempdir().unwrap();
    let first = learner::run(
        split_dir.path(),
        &learner::Settings {
            epochs: 1,
            ..fixed.clone()
        },
        None,
    );
    assert_eq!(first.reports.len(), 8);
    let resumed = learner::run(split_dir.path(), &fixed, Some(1));
    assert_eq!(resumed.reports.len(), 16);
    for (r, w) in resumed.reports.iter().zip(&whole.reports[8..]) {
        assert_eq!(
            (r.step, r.refreshed, r.mode, r.damping),
            (w.step, w.refreshed, w.mode, w.damping)
        );
    }
    assert_eq!(
        resumed.weights, whole.weights,
        "the resumed run trained differently"
    );

    // With adaptive damping the resume restarts the open period: its damping comes back from
    // the checkpoint, and the next verdict is the next period's.
    let adaptive_dir = tempfile::tempdir().unwrap();
    let adaptive = learner::Settings::default();
    let first = learner::run(
        adaptive_dir.path(),
        &learner::Settings {
            epochs: 1,
            ..learner::Settings::default()
        },
        None,
    );
    let resumed = learner::run(adaptive_dir.path(), &adaptive, Some(1));
    assert_eq!(resumed.reports[0].step, 8);
    assert_eq!(resumed.reports[0].damping, first.reports[7].damping);
    assert!(
        resumed.reports[0].period.is_none(),
        "{:?}",
        resumed.reports[0]
    );
    assert!(
        resumed.reports[4].period.is_some(),
        "{:?}",
        resumed.reports[4]
    );
    assert!(resumed.weights.iter().all(|w| w.is_finite()));
}
