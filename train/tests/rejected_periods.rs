//! Unnormalised pixels (0-255) at SGD's learning rate, where the natural-gradient defaults must
//! shorten the step by orders of magnitude: the training loss of an epoch counts the steps
//! whose updates stand (when adaptive damping rejects a period, its loss blew up and the weights
//! go back to its start, that period's steps leave the epoch's tally), and the step-length
//! factor can fall far enough for the loss to come down.

use std::path::Path;

use hylo_train::app::{run_training, Cli, Command, TrainCommand};
use hylo_train::output::read_metrics;

/// `hylo-train classify` on the kept MNIST digits, unnormalised, with the MLP.
fn raw_mnist(optim: &str, epochs: usize, seed: u64, out: &Path) -> TrainCommand {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../datasets/data/mnist-5k");
    let line = format!(
        "hylo-train classify --model mlp --dataset mnist --data-dir {data} --normalize raw \
         --optim {optim} --epochs {epochs} --seed {seed} --batch-size 64 --out {}",
        out.display()
    );
    match <Cli as clap::Parser>::parse_from(line.split_whitespace()).command {
        Some(Command::Classify(c)) => c,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_rejected_periods_blown_up_losses_are_not_in_the_epochs_training_loss() {
    // Unnormalised pixels (0-255) at SGD's learning rate: HyLo's first periods blow the loss up
    // to 1e20 and beyond and are rejected until the step is short enough.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("raw");
    run_training("classify", raw_mnist("hylo", 1, 0, &out)).unwrap();
    let log = std::fs::read_to_string(out.join("train.log")).unwrap();
    let rejected = log.matches("period rejected").count();
    assert!(rejected >= 1, "no period was rejected:\n{log}");
    let rows = read_metrics(&out.join("metrics.csv")).unwrap();
    let loss = rows[0].train_loss;
    // Counting the rejected periods' steps, this epoch's mean was 1e24 or more.
    assert!(loss.is_finite() && loss < 1e3, "{loss}\n{log}");
}

#[test]
fn kfac_on_unnormalised_pixels_shortens_its_step_until_the_loss_comes_down() {
    // K-FAC's model predicts overshoots of 1e5-1e7 there; with the step-length factor's floor at
    // 0.01 its loss climbed tenfold within two epochs on every seed (hylo-train stopped the run
    // as diverging at steps 100-180).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kfac");
    let outcome = run_training("classify", raw_mnist("kfac", 3, 1, &out));
    let log = std::fs::read_to_string(out.join("train.log")).unwrap_or_default();
    assert!(outcome.is_ok(), "{:?}\n{log}", outcome.err());
    let rows = read_metrics(&out.join("metrics.csv")).unwrap();
    assert_eq!(rows.len(), 3, "{log}");
    for pair in rows.windows(2) {
        let (before, after) = (pair[0].train_loss, pair[1].train_loss);
        assert!(
            after.is_finite() && after < before,
            "{before} -> {after}\n{log}"
        );
    }
    let accuracy = rows[2].val_score;
    assert!(accuracy > 0.8, "{accuracy}\n{log}");
}
