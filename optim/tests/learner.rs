//! The optimizers inside burn-train's `Learner` (the `learner` example): curvature is refreshed
//! on schedule, checkpoints hold the optimizer's state, and a run resumed from a checkpoint
//! continues as if it had never stopped.

#[path = "../examples/learner.rs"]
mod learner;

#[test]
fn the_learner_refreshes_curvature_and_resumes_with_the_same_optimizer_state() {
    let whole_dir = tempfile::tempdir().unwrap();
    let whole = learner::run(whole_dir.path(), 3, None);
    // 256 samples in batches of 32: 8 steps an epoch; curvature every 4 steps.
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

    // One epoch, then a new Learner resumed from its checkpoint for the other two.
    let split_dir = tempfile::tempdir().unwrap();
    let first = learner::run(split_dir.path(), 1, None);
    assert_eq!(first.reports.len(), 8);
    let resumed = learner::run(split_dir.path(), 3, Some(1));
    // The optimizer's state came back: its step counter, schedules and curvature.
    assert_eq!(resumed.reports.len(), 16);
    for (r, w) in resumed.reports.iter().zip(&whole.reports[8..]) {
        assert_eq!(
            (r.step, r.refreshed, r.mode, r.damping),
            (w.step, w.refreshed, w.mode, w.damping)
        );
    }
    let differing = resumed
        .weights
        .iter()
        .zip(&whole.weights)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differing, 0, "the resumed run trained differently");
    assert_eq!(resumed.weights.len(), whole.weights.len());
}
