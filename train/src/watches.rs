//! What the training loop watches at its log points, and when it stops: non-finite steps, a
//! blown-up training loss, the stop conditions.

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

use crate::optimizers::AnyOptimizer;

/// Why a training invocation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// All epochs done.
    Finished,
    /// `--max-steps` reached.
    MaxSteps,
    /// `--time-budget` spent.
    TimeBudget,
    /// Ctrl-C.
    Interrupted,
}

/// The training loss (its epoch-to-date mean at the loop's log points) may not grow beyond this
/// factor times its first value: the run stops with an error instead of training on.
pub const MAX_LOSS_GROWTH: f64 = 10.0;

/// Why this worker would stop after `step` steps and `elapsed` seconds, by priority: Ctrl-C,
/// `--max-steps`, `--time-budget`.
pub fn local_stop(
    interrupted: bool,
    step: u64,
    max_steps: Option<u64>,
    elapsed: f64,
    budget: Option<f64>,
) -> Option<Stop> {
    if interrupted {
        Some(Stop::Interrupted)
    } else if max_steps.is_some_and(|m| step >= m) {
        Some(Stop::MaxSteps)
    } else if budget.is_some_and(|t| elapsed >= t) {
        Some(Stop::TimeBudget)
    } else {
        None
    }
}

/// The stop of every worker, given whether any of them stops: its own reason, or `Interrupted`
/// when another worker stops (a worker left alone in a collective would hang).
pub fn joint_stop(any: bool, local: Option<Stop>) -> Option<Stop> {
    match (any, local) {
        (true, Some(stop)) => Some(stop),
        (true, None) => Some(Stop::Interrupted),
        (false, _) => None,
    }
}

/// Stops a run whose training loss blows up: its epoch-to-date mean at a log point above
/// [`MAX_LOSS_GROWTH`] times the first one, back above the first one after having come below
/// half of it (a collapse that a bounded loss such as Dice, which cannot grow tenfold, shows),
/// or not finite with an optimizer that does not skip non-finite steps (Burn's SGD and Adam;
/// ours skip them and [`SkipWatch`] counts them).
#[derive(Default)]
pub struct DivergenceWatch {
    first: Option<f64>,
    lowest: Option<f64>,
}

impl DivergenceWatch {
    /// Checks the loss at a log point.
    pub fn check(&mut self, loss: f64, step: u64, skips_non_finite: bool) -> Result<(), String> {
        const ADVICE: &str = "the last checkpoint is kept as it was (try a lower --lr; with \
                              sngd, kfac or hylo also --damping auto or --graft sgd)";
        if !loss.is_finite() {
            if skips_non_finite {
                return Ok(());
            }
            return Err(format!(
                "the training loss is {loss} at step {step}: training diverged and was stopped; \
                 {ADVICE}"
            ));
        }
        let first = *self.first.get_or_insert(loss);
        if loss > MAX_LOSS_GROWTH * first.abs() {
            return Err(format!(
                "the training loss grew from {first:.4} to {loss:.4} (more than {MAX_LOSS_GROWTH}x) \
                 by step {step}: training diverges and was stopped; {ADVICE}"
            ));
        }
        let lowest = self.lowest.map_or(loss, |l| l.min(loss));
        self.lowest = Some(lowest);
        if first > 0.0 && lowest < 0.5 * first && loss > first {
            return Err(format!(
                "the training loss went back from {lowest:.4} to {loss:.4}, above its first value \
                 {first:.4}, by step {step}: training diverges and was stopped; {ADVICE}"
            ));
        }
        Ok(())
    }
}

/// Skipped updates (NaN or Inf in the gradients), read at the loop's log points: logs new ones
/// and stops the run after `limit` consecutive skips.
pub struct SkipWatch {
    /// Skipped updates already logged.
    pub seen: u64,
    /// Consecutive skips that stop the run.
    pub limit: u64,
}

impl SkipWatch {
    /// Reads the optimizer's counters (one device read) at a log point.
    pub fn check<M: AutodiffModule<B>, B: AutodiffBackend>(
        &mut self,
        optim: &AnyOptimizer<M, B>,
        step: u64,
        log: &impl Fn(&str),
    ) -> Result<(), String> {
        self.judge(optim.skipped_steps(), step, log)
    }

    fn judge(
        &mut self,
        (total, consecutive): (u64, u64),
        step: u64,
        log: &impl Fn(&str),
    ) -> Result<(), String> {
        if total > self.seen {
            log(&format!(
                "{} update(s) skipped up to step {step} (NaN or Inf in the gradients; weights \
                 and momentum kept), {total} in all",
                total - self.seen
            ));
            self.seen = total;
        }
        if consecutive >= self.limit {
            return Err(format!(
                "the last {consecutive} steps (up to step {step}) all had NaN or Inf in their \
                 gradients and were skipped (--max-consecutive-skips {}): training stopped; the \
                 last checkpoint is kept as it was (try a lower --lr or a higher --damping)",
                self.limit
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_by_priority_and_together() {
        assert_eq!(
            local_stop(true, 9, Some(5), 9.0, Some(1.0)),
            Some(Stop::Interrupted)
        );
        assert_eq!(
            local_stop(false, 5, Some(5), 9.0, Some(1.0)),
            Some(Stop::MaxSteps)
        );
        assert_eq!(
            local_stop(false, 4, Some(5), 1.0, Some(1.0)),
            Some(Stop::TimeBudget)
        );
        assert_eq!(local_stop(false, 4, Some(5), 0.5, Some(1.0)), None);
        assert_eq!(local_stop(false, 4, None, 0.5, None), None);
        assert_eq!(joint_stop(true, Some(Stop::MaxSteps)), Some(Stop::MaxSteps));
        assert_eq!(joint_stop(true, None), Some(Stop::Interrupted));
        assert_eq!(joint_stop(false, None), None);
    }

    #[test]
    fn the_divergence_watch_stops_a_tenfold_loss_and_a_nan_one_where_nothing_skips() {
        let mut w = DivergenceWatch::default();
        assert!(w.check(2.0, 10, true).is_ok());
        assert!(w.check(19.9, 20, true).is_ok());
        let e = w.check(20.1, 30, true).unwrap_err();
        assert!(
            e.contains("grew from 2.0000 to 20.1000") && e.contains("step 30"),
            "{e}"
        );
        let mut w = DivergenceWatch::default();
        assert!(w.check(f64::NAN, 10, true).is_ok());
        assert!(w.check(f64::NAN, 10, false).unwrap_err().contains("NaN"));
        // The first finite value is the reference.
        assert!(w.check(1.0, 20, true).is_ok());
        assert!(w.check(10.5, 30, true).is_err());
    }

    #[test]
    fn a_bounded_loss_that_collapses_back_stops_the_run() {
        // Dice in [0, 1): from 0.9 down to 0.3, then back to 0.95 cannot grow tenfold, but it
        // undid every step of progress.
        let mut w = DivergenceWatch::default();
        for (loss, step) in [(0.9, 20), (0.6, 40), (0.3, 60), (0.7, 80), (0.89, 100)] {
            assert!(w.check(loss, step, true).is_ok(), "{loss}");
        }
        let e = w.check(0.95, 120, true).unwrap_err();
        assert!(e.contains("went back from 0.3000 to 0.9500"), "{e}");
        // Without progress below half the first loss, noise above it is not a collapse.
        let mut w = DivergenceWatch::default();
        for loss in [0.9, 0.8, 0.93, 0.7, 0.95] {
            assert!(w.check(loss, 20, true).is_ok(), "{loss}");
        }
    }

    #[test]
    fn the_skip_watch_logs_new_skips_and_stops_at_its_limit() {
        let lines = std::cell::RefCell::new(Vec::new());
        let log = |l: &str| lines.borrow_mut().push(l.to_string());
        let mut w = SkipWatch { seen: 0, limit: 3 };
        assert!(w.judge((0, 0), 5, &log).is_ok());
        assert!(w.judge((2, 2), 10, &log).is_ok());
        assert!(w.judge((2, 0), 15, &log).is_ok());
        let e = w.judge((5, 3), 20, &log).unwrap_err();
        assert!(e.contains("--max-consecutive-skips 3"), "{e}");
        let lines = lines.into_inner();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("2 update(s) skipped up to step 10"));
        assert!(lines[1].starts_with("3 update(s) skipped up to step 20"));
    }
}
