//! The training loss of an epoch counts the steps whose updates stand: when adaptive damping
//! rejects a period (its loss blew up; the weights go back to its start), that period's steps
//! leave the epoch's tally.

use hylo_train::app::{run_training, Cli, Command};
use hylo_train::output::read_metrics;

#[test]
fn a_rejected_periods_blown_up_losses_are_not_in_the_epochs_training_loss() {
    // Unnormalised pixels (0-255) at SGD's learning rate: HyLo's first periods blow the loss up
    // to 1e20 and beyond and are rejected until the step is short enough.
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../datasets/data/mnist-5k");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("raw");
    let line = format!(
        "hylo-train classify --model mlp --dataset mnist --data-dir {data} --normalize raw \
         --optim hylo --epochs 1 --batch-size 64 --out {}",
        out.display()
    );
    let command = match <Cli as clap::Parser>::parse_from(line.split_whitespace()).command {
        Some(Command::Classify(c)) => c,
        other => panic!("{other:?}"),
    };
    run_training("classify", command).unwrap();
    let log = std::fs::read_to_string(out.join("train.log")).unwrap();
    let rejected = log.matches("period rejected").count();
    assert!(rejected >= 1, "no period was rejected:\n{log}");
    let rows = read_metrics(&out.join("metrics.csv")).unwrap();
    let loss = rows[0].train_loss;
    // Counting the rejected periods' steps, this epoch's mean was 1e24 or more.
    assert!(loss.is_finite() && loss < 1e3, "{loss}\n{log}");
}
