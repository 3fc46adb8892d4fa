//! "Precise BatchNorm" before validation (`--bn-recalibrate`): the running statistics become the
//! batch statistics averaged at the current weights, and a run's training is left untouched.

use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::tensor::{Distribution, Int, Tensor};
use hylo_datasets::Batch;
use hylo_models::{Classifier, ClassifierSpec, ModelName};
use hylo_optim::CaptureHandle;
use hylo_train::task::{recalibrate_statistics, PendingTally, Tally, TrainModel};

type A = Autodiff<Flex>;

/// Burn's random numbers are process-wide: the tests draw theirs in turn.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn batch(seed: u64, shift: f64) -> Batch<A> {
    let dev = Default::default();
    <A as burn::tensor::backend::Backend>::seed(&dev, seed);
    Batch {
        images: Tensor::random([8, 3, 8, 8], Distribution::Normal(shift, 1.0), &dev),
        labels: Some(Tensor::<A, 1, Int>::from_ints(
            [0, 1, 2, 3, 0, 1, 2, 3],
            &dev,
        )),
        masks: None,
        indices: (0..8).collect(),
        skipped: Vec::new(),
    }
}

/// The validation loss of `model` (running statistics) on `batch`.
fn eval_loss(model: &Classifier<A>, batch: &Batch<A>) -> f64 {
    let inner = Batch {
        images: batch.images.clone().inner(),
        labels: batch.labels.clone().map(|l| l.inner()),
        masks: None,
        indices: batch.indices.clone(),
        skipped: Vec::new(),
    };
    let mut pending = PendingTally::default();
    Classifier::<A>::evaluate(&model.valid(), inner, None, &mut pending);
    let mut tally = Tally::default();
    pending.flush(&mut tally);
    tally.loss()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn recalibrated_statistics_make_evaluation_match_the_batch_statistics() {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Default::default();
    let capture = CaptureHandle::new();
    let spec = ClassifierSpec::new(3, 8, 4);
    let model = Classifier::<A>::build(ModelName::CifarResNet(20), &spec, &capture, &dev).unwrap();
    // Running statistics from inputs unlike the data (stale, as after fast-moving weights).
    for i in 0..5 {
        let _ = model.objective(batch(100 + i, 4.0));
    }
    let b = batch(1, 0.0);
    let train_mode = model.objective(b.clone()).into_scalar() as f64;
    let stale = eval_loss(&model, &b);
    assert!(rel(stale, train_mode) > 0.05, "{stale} {train_mode}");
    // Recalibrated on that batch alone, evaluation normalises with its statistics: the same
    // loss as the training-mode forward pass (biased variances on both sides).
    capture.arm(true);
    let used = recalibrate_statistics(&model, [Ok(b.clone())], &capture).unwrap();
    assert_eq!(used, 1);
    // Capture was off in the recalibration and is armed again after it.
    assert!(capture.is_armed());
    assert_eq!(capture.pending_len(), 0);
    let recalibrated = eval_loss(&model, &b);
    assert!(
        rel(recalibrated, train_mode) < 1e-4,
        "{recalibrated} {train_mode}"
    );
    // Over two batches the statistics are their average, whatever came before: recalibrating
    // from other running statistics gives the same evaluation.
    let c = batch(2, 0.5);
    recalibrate_statistics(&model, [Ok(b.clone()), Ok(c.clone())], &capture).unwrap();
    let from_recalibrated = eval_loss(&model, &b);
    for i in 0..3 {
        let _ = model.objective(batch(200 + i, -3.0));
    }
    recalibrate_statistics(&model, [Ok(b.clone()), Ok(c)], &capture).unwrap();
    let from_stale = eval_loss(&model, &b);
    assert!(
        rel(from_stale, from_recalibrated) < 1e-5,
        "{from_stale} {from_recalibrated}"
    );
    assert!(rel(from_recalibrated, train_mode) > 1e-4);
    // A batch that cannot be read is reported.
    let err = recalibrate_statistics(&model, [Err("bad.png: not an image".to_string())], &capture);
    assert_eq!(err.unwrap_err(), "bad.png: not an image");
}

#[test]
fn recalibration_changes_validation_and_leaves_training_alone() {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    use hylo_train::app::{run_training, Cli, Command};
    use hylo_train::output::read_metrics;
    let dir = tempfile::tempdir().unwrap();
    let run = |n: u64, at_checks: u64| {
        let out = dir.path().join(format!("bn{n}-{at_checks}"));
        let line = format!(
            "hylo-train classify --model resnet20 --image-size 8 --optim hylo --epochs 2 \
             --train-samples 128 --val-samples 64 --batch-size 16 --freq 3 --lr 0.5 \
             --val-every 3 --bn-recalibrate {n} --bn-recalibrate-checks {at_checks} --out {}",
            out.display()
        );
        let command = match <Cli as clap::Parser>::parse_from(line.split_whitespace()).command {
            Some(Command::Classify(c)) => c,
            other => panic!("{other:?}"),
        };
        let outcome = run_training("classify", command).unwrap();
        let checks: Vec<f64> = outcome.checks.iter().map(|c| c.val_score).collect();
        (read_metrics(&out.join("metrics.csv")).unwrap(), checks)
    };
    let ((off, off_checks), (on, on_checks)) = (run(0, 0), run(4, 0));
    assert_eq!((off.len(), on.len()), (2, 2));
    for (a, b) in off.iter().zip(&on) {
        assert_eq!(a.train_loss, b.train_loss);
        assert_ne!(a.val_loss, b.val_loss);
    }
    // `--bn-recalibrate-checks 0`: the checks read the running statistics (the same as with no
    // recalibration until the first epoch's end recalibrates them).
    assert_eq!((off_checks.len(), on_checks.len()), (5, 5));
    assert_eq!(on_checks[..2], off_checks[..2]);
    // Recalibrated at the checks too: the checks change, the epochs' rows do not (each epoch's
    // end recalibrates from scratch).
    let (both, both_checks) = run(4, 2);
    assert_eq!(both_checks.len(), 5);
    assert_ne!(both_checks[..2], on_checks[..2]);
    for (a, b) in on.iter().zip(&both) {
        assert_eq!((a.train_loss, a.val_loss), (b.train_loss, b.val_loss));
    }
}
