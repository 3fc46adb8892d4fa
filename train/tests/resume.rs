//! Resuming after N steps gives the metrics of an uninterrupted run, and auto damping recovers
//! where a fixed damping diverges: runs that depend on their exact initial weights, so they take
//! turns (weight initialisation draws from the backend's process-wide RNG).

use std::path::Path;

use clap::Parser;
use hylo_train::app::{run_training, Cli, Command, TrainCommand};
use hylo_train::output::{read_metrics, MetricsRow};
use hylo_train::trainer::Stop;

fn train_command(line: &str) -> TrainCommand {
    match Cli::try_parse_from(line.split_whitespace())
        .unwrap()
        .command
    {
        Some(Command::Classify(c)) => c,
        other => panic!("not a classify command: {other:?}"),
    }
}

fn tiny(optim: &str, out: &Path, extra: &str) -> TrainCommand {
    train_command(&format!(
        "hylo-train classify --optim {optim} --epochs 2 --train-samples 256 --val-samples 64 \
         --batch-size 32 --freq 3 --out {} {extra}",
        out.display()
    ))
}

fn without_wall_time(out: &Path) -> Vec<MetricsRow> {
    read_metrics(&out.join("metrics.csv"))
        .unwrap()
        .into_iter()
        .map(|mut r| {
            r.wall_s = 0.0;
            r
        })
        .collect()
}

/// One test at a time: weights are drawn from the process-wide RNG, so runs in parallel tests
/// would start from other weights than their seed gives.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// An uninterrupted run and one stopped after 11 steps (mid-epoch, mid-period with `--freq 3`)
/// and resumed, as metrics rows.
fn whole_and_resumed(optim: &str, extra: &str) -> (Vec<MetricsRow>, Vec<MetricsRow>) {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let extra = format!("--warmup-epochs 1 --milestones 1 {extra}");
    run_training("classify", tiny(optim, &whole, &extra)).unwrap();
    let split = dir.path().join("split");
    let first = run_training(
        "classify",
        tiny(optim, &split, &format!("{extra} --max-steps 11")),
    )
    .unwrap();
    assert_eq!(
        (
            first.stop,
            first.state.global_step,
            first.state.step_in_epoch
        ),
        (Stop::MaxSteps, 11, 3)
    );
    let resume = train_command(&format!("hylo-train classify --resume {}", split.display()));
    let second = run_training("classify", resume).unwrap();
    assert_eq!(second.stop, Stop::Finished);
    (without_wall_time(&whole), without_wall_time(&split))
}

#[test]
fn resume_with_auto_damping_continues_the_refresh_period() {
    // The stop falls inside a refresh period: the checkpoint keeps the period (the layers'
    // parameters and gradients at its start, the refresh batch's position and loss), so the
    // resumed run adapts the damping exactly as the uninterrupted one, bit for bit. (The two
    // runs' parameter ids differ: sums over layers, such as the KL clip's, must not follow
    // them.) Without grafting the step is the preconditioned update itself, so its quadratic
    // term is a real part of the model's prediction and the rule moves the damping.
    for optim in ["hylo", "sngd", "kfac"] {
        let (whole, split) =
            whole_and_resumed(optim, "--damping auto:0.1 --kl-clip 0.001 --graft none");
        assert_eq!(format!("{whole:?}"), format!("{split:?}"), "{optim}");
        // The damping moved: the rule ran across the resume.
        assert!(
            whole.iter().any(|r| r.damping != Some(0.1)),
            "{optim}: {whole:?}"
        );
    }
}

#[test]
fn resume_after_n_steps_gives_the_same_metrics() {
    // Bit for bit with a fixed damping.
    for optim in ["hylo", "kfac", "sgd"] {
        let (whole, split) = whole_and_resumed(optim, "--damping 0.3");
        assert_eq!(format!("{whole:?}"), format!("{split:?}"), "{optim}");
    }
}

#[test]
fn auto_damping_recovers_from_a_damping_that_diverges_when_fixed() {
    // HyLo as in the paper (its own update, SpatialMean rows) with momentum and a refresh every
    // 10 steps: a damping of 0.003 held fixed blows the loss up within the first period and every
    // later step is NaN.
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let run = |damping: &str, name: &str| {
        run_training(
            "classify",
            train_command(&format!(
                "hylo-train classify --optim hylo --graft none --conv-mode spatial-mean --epochs 3 \
                 --train-samples 1024 --val-samples 256 --batch-size 64 --freq 10 --seed 1 \
                 --max-consecutive-skips 10 --damping {damping} --out {}",
                dir.path().join(name).display()
            )),
        )
    };
    let fixed = run("0.003", "fixed");
    assert!(
        fixed.as_ref().is_err_and(|e| e.contains("NaN")),
        "{:?}",
        fixed.map(|o| o.stop)
    );
    // From the same start the adaptive rule rejects the periods whose loss blew up (weights back
    // to their start, damping x10) and trains.
    let outcome = run("auto:0.003", "auto").unwrap();
    assert_eq!(outcome.stop, Stop::Finished);
    let last = |name: &str| {
        read_metrics(&dir.path().join(name).join("metrics.csv"))
            .unwrap()
            .pop()
            .unwrap()
    };
    let adaptive = last("auto");
    assert!(adaptive.val_score > 0.9, "{adaptive:?}");
    assert!(adaptive.damping.is_some_and(|d| d >= 0.03), "{adaptive:?}");
    let log = std::fs::read_to_string(dir.path().join("auto/train.log")).unwrap();
    assert!(log.contains("period rejected"), "{log}");
    // KAISA's KL clip bounds the steps instead: the fixed damping then trains, poorly; the
    // adaptive rule from the same start with the clip ends well below it.
    let clipped = run("0.003 --kl-clip 0.001", "clipped").unwrap();
    let both = run("auto:0.003 --kl-clip 0.001", "auto-clipped").unwrap();
    assert_eq!((clipped.stop, both.stop), (Stop::Finished, Stop::Finished));
    let (clipped, both) = (last("clipped"), last("auto-clipped"));
    assert!(
        both.train_loss < 0.8 * clipped.train_loss,
        "{both:?} against {clipped:?}"
    );
}
