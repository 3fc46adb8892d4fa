//! Resuming after N steps gives the metrics of an uninterrupted run. Alone in its test binary:
//! weight initialisation draws from the backend's process-wide RNG, which parallel tests would
//! share.

use std::path::Path;

use clap::Parser;
use hylo_train::app::{run_training, Cli, Command, TrainCommand};
use hylo_train::output::read_metrics;
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

fn without_wall_time(out: &Path) -> Vec<String> {
    read_metrics(&out.join("metrics.csv"))
        .unwrap()
        .into_iter()
        .map(|mut r| {
            r.wall_s = 0.0;
            format!("{r:?}")
        })
        .collect()
}

#[test]
fn resume_after_n_steps_gives_the_same_metrics() {
    for optim in ["hylo", "kfac", "sgd"] {
        let dir = tempfile::tempdir().unwrap();
        let whole = dir.path().join("whole");
        run_training(
            "classify",
            tiny(optim, &whole, "--warmup-epochs 1 --milestones 1"),
        )
        .unwrap();
        let split = dir.path().join("split");
        let first = run_training(
            "classify",
            tiny(
                optim,
                &split,
                "--warmup-epochs 1 --milestones 1 --max-steps 11",
            ),
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
        assert_eq!(
            without_wall_time(&whole),
            without_wall_time(&split),
            "{optim}"
        );
    }
}
