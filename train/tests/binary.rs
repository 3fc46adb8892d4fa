//! The `hylo-train` executable: one-line errors with a non-zero exit, and Ctrl-C saving a
//! checkpoint that `--resume` continues.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hylo-train"))
}

#[test]
fn bad_arguments_and_data_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["classify", "--model", "resnet33", "--out"],
        vec![
            "classify",
            "--dataset",
            "mnist",
            "--data-dir",
            "/definitely/missing",
            "--out",
        ],
    ] {
        let mut args: Vec<String> = args.into_iter().map(String::from).collect();
        args.push(dir.path().join("o").display().to_string());
        let out = bin().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("error: ") && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
    let out = bin().args(["classify", "--epochs", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    let child = bin()
        .args([
            "classify",
            "--epochs",
            "1000",
            "--train-samples",
            "256",
            "--val-samples",
            "32",
            "--batch-size",
            "32",
            "--out",
        ])
        .arg(&out_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training has written its first epoch, then interrupt.
    let start = Instant::now();
    while !out_dir.join("checkpoint/state.json").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let log = std::fs::read_to_string(out_dir.join("train.log")).unwrap();
    assert!(log.contains("stopped (Interrupted)"), "{log}");
    // The saved run resumes (and stops at once under --max-steps 1 more step).
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("checkpoint/state.json")).unwrap(),
    )
    .unwrap();
    let steps = state["global_step"].as_u64().unwrap();
    let resumed = bin()
        .args([
            "classify",
            "--max-steps",
            &(steps + 1).to_string(),
            "--resume",
        ])
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert!(String::from_utf8_lossy(&resumed.stdout).contains(&format!("{} steps", steps + 1)));
}

fn metrics_without_wall_time(dir: &std::path::Path) -> Vec<String> {
    hylo_train::output::read_metrics(&dir.join("metrics.csv"))
        .unwrap()
        .into_iter()
        .map(|mut r| {
            r.wall_s = 0.0;
            format!("{r:?}")
        })
        .collect()
}

const SHORT_RUN: [&str; 12] = [
    "classify",
    "--epochs",
    "3",
    "--train-samples",
    "128",
    "--val-samples",
    "32",
    "--batch-size",
    "32",
    "--freq",
    "3",
    "--out",
];

#[test]
fn a_run_killed_between_checkpoint_and_metrics_resumes_to_the_same_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let out = bin().args(SHORT_RUN).arg(&whole).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Killed right after the first epoch's checkpoint, before its metrics.csv row.
    let killed = dir.path().join("killed");
    let out = bin()
        .args(SHORT_RUN)
        .arg(&killed)
        .env("HYLO_FAULT", "after-checkpoint")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the fault point did not fire");
    assert_eq!(metrics_without_wall_time(&killed).len(), 0, "no row yet");
    let out = bin()
        .args(["classify", "--resume"])
        .arg(&killed)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        metrics_without_wall_time(&killed),
        metrics_without_wall_time(&whole)
    );
    assert_eq!(metrics_without_wall_time(&whole).len(), 3);
}

#[test]
fn steps_that_keep_failing_stop_the_run_with_the_last_checkpoint_kept() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // From epoch 1 on the learning rate is 1e30: the first such step overflows the weights,
    // every later gradient is NaN and every update is skipped (4 steps an epoch; skips are
    // checked every 2 steps).
    let out = bin()
        .args(SHORT_RUN)
        .arg(&run)
        .args([
            "--optim",
            "sngd",
            "--damping",
            "0.3",
            "--milestones",
            "1",
            "--lr-decay",
            "1e31",
            "--log-every",
            "2",
            "--max-consecutive-skips",
            "4",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("steps (up to step") && stderr.contains("--max-consecutive-skips 4"),
        "{stderr}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/state.json")).unwrap())
            .unwrap();
    // The run stopped in epoch 3; the checkpoint of epoch 2 (step 8) is the one kept.
    assert_eq!(
        (state["epoch"].as_u64(), state["global_step"].as_u64()),
        (Some(2), Some(8))
    );
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("update(s) skipped"), "{log}");
}

#[test]
fn periods_that_keep_blowing_up_stop_the_run_with_the_last_checkpoint_kept() {
    // A learning rate of 1e30 from epoch 1 on, with adaptive damping and a refresh every step:
    // each period's loss blows up, is rejected (weights restored, damping raised) and blows up
    // again; after five rejections in a row the run stops.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = bin()
        .args([
            "classify",
            "--epochs",
            "5",
            "--train-samples",
            "128",
            "--val-samples",
            "32",
            "--batch-size",
            "32",
            "--freq",
            "1",
            "--optim",
            "sngd",
            "--milestones",
            "1",
            "--lr-decay",
            "1e31",
            "--out",
        ])
        .arg(&run)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("5 curvature periods in a row were rejected"),
        "{stderr}"
    );
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert_eq!(log.matches("period rejected").count(), 5, "{log}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/state.json")).unwrap())
            .unwrap();
    // Stopped inside an epoch: the checkpoint of an earlier epoch is the one kept.
    assert!(
        state["epoch"].as_u64().is_some_and(|e| (1..5).contains(&e)),
        "{state}"
    );
}

#[test]
fn a_training_loss_that_grows_tenfold_stops_the_run() {
    // SGD with a learning rate far too large and no NaN: the loss grows by orders of magnitude.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = bin()
        .args(SHORT_RUN)
        .arg(&run)
        .args(["--optim", "sgd", "--lr", "3", "--log-every", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the training loss grew from") && stderr.contains("training diverges"),
        "{stderr}"
    );
}

#[test]
fn a_checkpoint_of_an_earlier_version_is_refused_with_a_clear_message() {
    // Written by hylo-train 0.1 (HyLo with adaptive damping, stopped at step 5 of an MLP run):
    // its optimizer record has the old layout.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("old");
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint-2026-11");
    std::fs::create_dir_all(run.join("checkpoint")).unwrap();
    for file in [
        "config.json",
        "metrics.csv",
        "train.log",
        "checkpoint/model.bin",
        "checkpoint/optimizer.bin",
        "checkpoint/state.json",
    ] {
        std::fs::copy(fixture.join(file), run.join(file)).unwrap();
    }
    let out = bin()
        .args(["classify", "--resume"])
        .arg(&run)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("optimizer") && stderr.contains("written by an earlier hylo-optim"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
