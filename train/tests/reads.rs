//! Blocking device reads of a whole `hylo-train` run on the CPU, step by step: none between
//! curvature refreshes, and at a refresh exactly what the README lists.

use clap::Parser;
use hylo_train::app::{run_training, Cli, Command};

/// Reads of each step of a `classify` run with `flags`.
fn reads(flags: &str) -> Vec<u64> {
    run(flags)
        .traffic_per_step
        .iter()
        .map(|t| t.reads)
        .collect()
}

/// A 2-epoch `classify` run (16 steps of batch 32) with `flags`.
fn run(flags: &str) -> hylo_train::trainer::Outcome {
    let dir = tempfile::tempdir().unwrap();
    let line = format!(
        "hylo-train classify --train-samples 256 --val-samples 64 --batch-size 32 --epochs 2 \
         --freq 4 --log-every 1000 {flags} --out {}",
        dir.path().display()
    );
    let Some(Command::Classify(cmd)) = Cli::try_parse_from(line.split_whitespace())
        .unwrap()
        .command
    else {
        unreachable!()
    };
    run_training("classify", cmd).unwrap()
}

#[test]
fn a_training_run_reads_the_device_only_at_refreshes() {
    // small-cnn: L = 3 preconditioned layers. At a refresh every optimizer reads the gradients'
    // NaN flag; adaptive damping reads one triple per judged period (every refresh but the
    // first, which has no period before it).
    let layers = 3;
    let judged = |step: usize| u64::from(step > 0);
    for (flags, refresh) in [
        // SNGD: each layer's n x n kernel.
        ("--optim sngd", 1 + layers),
        // HyLo (KIS): the gradient norm, and per layer the sampling weights and the r x r kernel.
        ("--optim hylo --switch kis", 2 + 2 * layers),
        // HyLo (KID): the gradient norm, and per layer the local kernel and the skeleton's.
        ("--optim hylo --switch kid", 2 + 2 * layers),
        // K-FAC: each layer's two factors at an inversion (every 8 steps); the NaN flag alone
        // when the factors are only updated (step 4 of each 8).
        ("--optim kfac --inverse-every 8", 1 + 2 * layers),
    ] {
        let reads = reads(flags);
        assert_eq!(reads.len(), 16, "{flags}");
        for (step, &r) in reads.iter().enumerate() {
            let kfac = flags.contains("kfac");
            let expected = match step {
                s if kfac && s % 8 == 4 => 1,
                s if kfac && s % 8 == 0 => refresh as u64 + judged(s),
                s if !kfac && s % 4 == 0 => refresh as u64 + judged(s),
                _ => 0,
            };
            assert_eq!(
                r, expected,
                "{flags}: step {step} read {r} times, expected {expected}"
            );
        }
    }
    // SGD reads nothing; neither does a fixed damping at the refresh beyond the matrices.
    assert!(reads("--optim sgd").iter().all(|&r| r == 0));
    let fixed = reads("--optim sngd --damping 0.3");
    assert_eq!(fixed[4], 1 + layers as u64);
}

#[test]
fn steps_between_refreshes_move_no_bytes_and_a_refresh_moves_its_matrices() {
    // Uploads are counted too: a plain step neither reads nor uploads. SNGD's refresh reads each
    // layer's n x n kernel (n = 32, f32) and uploads its factorisation of the same size.
    let layers = 3u64;
    let kernel = 32 * 32 * 4;
    for flags in ["--optim sngd --damping 0.3", "--optim hylo", "--optim kfac"] {
        let outcome = run(flags);
        assert_eq!(outcome.traffic_per_step.len(), 16, "{flags}");
        for (step, t) in outcome.traffic_per_step.iter().enumerate() {
            if step % 4 != 0 {
                assert_eq!(t.bytes(), 0, "{flags}: step {step} moved {t:?}");
            }
        }
        assert!(outcome.traffic_per_step[0].upload_bytes > 0, "{flags}");
    }
    // With a fixed damping: the NaN flag (4 bytes) and the three kernels read, the three
    // factorisations uploaded.
    let sngd = run("--optim sngd --damping 0.3").traffic_per_step;
    for step in [0, 4, 8, 12] {
        assert_eq!(
            sngd[step],
            hylo_optim::host::Traffic {
                reads: 1 + layers,
                read_bytes: 4 + layers * kernel,
                uploads: layers,
                upload_bytes: layers * kernel,
            },
            "step {step}"
        );
    }
}
