//! Resuming after N steps gives the metrics of an uninterrupted run. The runs take turns:
//! weight initialisation draws from the backend's process-wide RNG, which parallel tests would
//! share.

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

/// An uninterrupted run and one stopped after 11 steps (mid-epoch, mid-period with `--freq 3`)
/// and resumed, as metrics rows.
fn whole_and_resumed(optim: &str, extra: &str) -> (Vec<MetricsRow>, Vec<MetricsRow>) {
    // One run at a time: weights are drawn from the process-wide RNG.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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
    // runs' parameter ids differ: sums over layers must not follow them.)
    for optim in ["hylo", "sngd", "kfac"] {
        let (whole, split) = whole_and_resumed(optim, "--damping auto:0.1");
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
