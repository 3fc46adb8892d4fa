//! Validation during a run: BatchNorm's statistics recalibrated at the current weights
//! (`--bn-recalibrate`), then the validation set's tally, at epoch ends and at `--val-every`
//! checks.

use burn::tensor::backend::AutodiffBackend;
use hylo_models::batch_norm::has_running_statistics;
use hylo_optim::comm::average_buffers;

use super::Run;
use crate::task::{recalibrate_statistics, validate, Tally, TrainModel};

/// A validation between epochs (`--val-every`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ValCheck {
    /// Optimizer steps so far.
    pub step: u64,
    /// Seconds of training so far.
    pub wall_s: f64,
    /// Validation accuracy or Dice.
    pub val_score: f64,
}

impl<B: AutodiffBackend, M: TrainModel<B>> Run<'_, B, M> {
    /// The model's validation tally on this rank's validation set.
    fn validate(&self) -> Result<Tally, String> {
        let setup = self.setup;
        validate::<B, M>(
            setup.data,
            &self.val_batcher,
            &self.model,
            setup.args.batch_size as usize,
            setup.device,
            &|l: &str| setup.log(l),
        )
    }

    /// `--bn-recalibrate`: the BatchNorm statistics recomputed at the current weights as the
    /// average over the first `n` batches of the current epoch (forward passes only, no capture,
    /// no step), then averaged over the ranks; models without running statistics are left alone.
    fn recalibrate(&mut self, n: u64) -> Result<(), String> {
        let n = n as usize;
        if n == 0 || !has_running_statistics::<B, M>(&self.model) {
            return Ok(());
        }
        let batches = self.train_loader(self.state.epoch, 0);
        let batches = batches.iter().take(n).map(|b| b.map_err(|e| e.to_string()));
        recalibrate_statistics(&self.model, batches, self.setup.capture)?;
        let comm = self.setup.workers.comm.as_ref();
        self.model = average_buffers::<B, M>(self.model.clone(), comm).0;
        Ok(())
    }

    /// The validation tally after recalibrating on `--bn-recalibrate` batches, or at a
    /// `--val-every` check (`at_check`) on `--bn-recalibrate-checks` (at most as many).
    pub(super) fn recalibrate_and_validate(&mut self, at_check: bool) -> Result<Tally, String> {
        let args = &self.setup.args;
        let n = match at_check {
            true => args.bn_recalibrate_checks.min(args.bn_recalibrate),
            false => args.bn_recalibrate,
        };
        self.recalibrate(n)?;
        self.validate()
    }

    /// `--val-every`: validates between epochs, for the time to a target.
    pub(super) fn check_point(&mut self) -> Result<(), String> {
        let every = self.setup.args.val_every.unwrap_or(0);
        let step = self.state.global_step;
        if every == 0 || !step.is_multiple_of(every) {
            return Ok(());
        }
        let wall_s = self.wall();
        let val = self.paused(|run| run.recalibrate_and_validate(true))?;
        self.checks.push(ValCheck {
            step,
            wall_s,
            val_score: val.score(),
        });
        Ok(())
    }
}
