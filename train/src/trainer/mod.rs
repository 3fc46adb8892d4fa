//! The training loop as a [`Run`] with named phases: [`Run::start`] (a new run or a resume),
//! [`Run::epoch`] of [`Run::step`]s with their log points, [`Run::end_epoch`] (validation,
//! metrics, checkpoint) and [`Run::finish`], the one exit.

mod setup;
mod validation;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use hylo_datasets::{loader, Batch, BatchLoader, SampleBatcher};
use hylo_optim::comm::{all_reduce_mean, average_buffers};
use hylo_optim::schedule::{WarmupMultiStep, WarmupMultiStepConfig};
use hylo_optim::{CaptureHandle, PeriodVerdict};

use crate::cli::TrainArgs;
use crate::data::DataSources;
use crate::optimizers::{AnyOptimizer, CheckpointRecorder};
use crate::output::{self, restore_metrics, MetricsRow, RefreshPoint, RunState};
pub use crate::task::validate;
use crate::task::{PendingTally, Tally, TrainModel};
pub use crate::watches::Stop;
use crate::watches::{joint_stop, local_stop, DivergenceWatch, SkipWatch};
use crate::workers::Workers;
use setup::Bars;
pub use setup::Setup;
pub use validation::ValCheck;

/// The result of a training invocation.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Why it ended.
    pub stop: Stop,
    /// Where the run stands.
    pub state: RunState,
    /// The rows written by this invocation.
    pub rows: Vec<MetricsRow>,
    /// Validation loss and score when it ended.
    pub final_val: (f64, f64),
    /// How it ended, in one line (set by the caller on the rank that writes).
    pub summary: Option<String>,
    /// Host<->device traffic through `hylo_optim::host` of each optimizer step of this
    /// invocation (forward, backward, all-reduce, update; the log points' reads are not a
    /// step's): reads and uploads with their bytes (the batches' uploads are not counted).
    pub traffic_per_step: Vec<hylo_optim::host::Traffic>,
    /// The `--val-every` validations of this invocation.
    pub checks: Vec<ValCheck>,
}

/// Set by the Ctrl-C handler; the trainer saves and stops at the next step.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Trains `model` on `data` as `args` say, writing into `args.out`; `resume` continues the
/// checkpoint found there. `command` (`classify`/`segment`) goes into `config.json`.
#[allow(clippy::too_many_arguments)]
pub fn train<B, M>(
    args: &TrainArgs,
    command: &str,
    data: &DataSources,
    model: M,
    capture: &CaptureHandle,
    device: &B::Device,
    resume: bool,
    workers: &Workers,
) -> Result<Outcome, String>
where
    B: AutodiffBackend,
    M: TrainModel<B>,
{
    let mut run = Run::start(
        Setup {
            args,
            command,
            data,
            capture,
            device,
            workers,
        },
        model,
        resume,
    )?;
    while run.state.epoch < args.epochs {
        if let Some(stop) = run.epoch()? {
            return run.finish(stop);
        }
    }
    run.finish(Stop::Finished)
}

/// A training run in progress.
pub struct Run<'a, B: AutodiffBackend, M: TrainModel<B>> {
    setup: Setup<'a, B>,
    model: M,
    optim: AnyOptimizer<M, B>,
    /// Where the run stands (saved with every checkpoint).
    pub state: RunState,
    schedule: WarmupMultiStep,
    train_batcher: SampleBatcher,
    val_batcher: SampleBatcher,
    steps_per_epoch: usize,
    local_batch: usize,
    bars: Bars,
    pending: PendingTally<B::InnerBackend>,
    skips: SkipWatch,
    divergence: DivergenceWatch,
    started: Instant,
    wall_before: f64,
    /// Seconds of this invocation spent validating and writing checkpoints, metrics and plots:
    /// not training time.
    paused: f64,
    first_step: u64,
    lr: f64,
    /// Rows of this invocation.
    rows: Vec<MetricsRow>,
    /// Device reads of each step of this invocation.
    traffic_per_step: Vec<hylo_optim::host::Traffic>,
    /// Validation loss and score of the last epoch ended in this invocation.
    last_val: Option<(f64, f64)>,
    /// `--val-every` validations of this invocation.
    checks: Vec<ValCheck>,
}

impl<'a, B: AutodiffBackend, M: TrainModel<B>> Run<'a, B, M> {
    /// A new run (output directory prepared) or a resumed one (model, optimizer, position and
    /// metrics from the checkpoint in `--out`).
    pub fn start(setup: Setup<'a, B>, model: M, resume: bool) -> Result<Self, String> {
        let args = setup.args;
        let (steps_per_epoch, local_batch) = setup.batches()?;
        setup
            .workers
            .check_same_config(&serde_json::to_string(args).map_err(|e| e.to_string())?)?;
        let out = args.out_dir();
        let optim =
            AnyOptimizer::<M, B>::build(args, steps_per_epoch, setup.capture, setup.workers)?;
        let (model, optim, state) = if resume {
            let (paths, mut state) = output::find_checkpoint(out)?;
            if setup.workers.writes() {
                restore_metrics(out, &mut state, M::SEGMENTS)?;
            }
            let model = model
                .load_file(paths.model(), &CheckpointRecorder::new(), setup.device)
                .map_err(|e| format!("{}: cannot load the model: {e}", paths.model().display()))?;
            let optim = optim.load(&paths.optimizer(), setup.device)?;
            setup.log(&format!(
                "resumed at epoch {} step {}",
                state.epoch, state.global_step
            ));
            (model, optim, state)
        } else {
            if setup.workers.writes() {
                std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
                let _ = std::fs::remove_file(out.join("train.log"));
                output::write_config(out, args, setup.command)?;
                output::write_metrics(&out.join("metrics.csv"), &[], M::SEGMENTS)?;
            }
            (model, optim, RunState::default())
        };
        setup.log(&format!(
            "device {}",
            crate::device::describe(args.device()?)?
        ));
        if setup.workers.distributed() {
            setup.log(&format!(
                "data parallel over {} ranks: local batch {local_batch} of {}",
                setup.workers.size(),
                args.batch_size
            ));
        }
        let spe = steps_per_epoch;
        let schedule = WarmupMultiStepConfig::new(args.lr())
            .with_warmup_steps(args.warmup_epochs as usize * spe)
            .with_milestones(args.milestones.iter().map(|&m| m as usize * spe).collect())
            .with_decay(args.lr_decay)
            .init()
            .map_err(|e| e.to_string())?;
        let batcher = |source| {
            SampleBatcher::new(source, setup.data.normalization.clone(), args.seed)
                .skip_bad(args.skip_bad_samples)
        };
        let mut run = Self {
            skips: SkipWatch {
                seen: optim.skipped_steps().0,
                limit: args.max_consecutive_skips,
            },
            bars: Bars::new(args.epochs, state.epoch, spe as u64, setup.workers.writes()),
            lr: schedule.rate_at(state.global_step as usize),
            first_step: state.global_step,
            wall_before: state.wall_s,
            train_batcher: batcher(setup.data.train.clone()),
            val_batcher: batcher(setup.data.val.clone()),
            setup,
            model,
            optim,
            state,
            schedule,
            steps_per_epoch,
            local_batch,
            pending: PendingTally::default(),
            divergence: DivergenceWatch::default(),
            started: Instant::now(),
            paused: 0.0,
            checks: Vec::new(),
            rows: Vec::new(),
            traffic_per_step: Vec::new(),
            last_val: None,
        };
        run.restore_period_batch()?;
        Ok(run)
    }

    /// After a resume inside a curvature period, gives the capture handle the period's first
    /// batch back (adaptive damping evaluates it at the period's end).
    fn restore_period_batch(&mut self) -> Result<(), String> {
        let Some(point) = self.state.refresh else {
            return Ok(());
        };
        let batch = self
            .train_loader(point.epoch, point.step_in_epoch)
            .iter()
            .next()
            .ok_or("the first batch of the curvature period is past its epoch's end")?
            .map_err(|e| e.to_string())?;
        self.setup.capture.restore_period_batch(batch);
        Ok(())
    }

    /// This rank's training batches of `epoch`, from batch `skip` on.
    fn train_loader(&self, epoch: u64, skip: u64) -> BatchLoader<B> {
        let order = self.setup.order(epoch, skip);
        loader::<B>(
            self.train_batcher.clone(),
            order,
            self.local_batch,
            self.setup.device,
        )
    }

    /// Seconds of training so far (across resumes): validation and the writing of
    /// checkpoints, metrics and plots are left out, so optimizers are timed alike.
    fn wall(&self) -> f64 {
        self.wall_before + self.started.elapsed().as_secs_f64() - self.paused
    }

    /// Runs `work` off the training clock.
    fn paused<T>(&mut self, work: impl FnOnce(&mut Self) -> T) -> T {
        let start = Instant::now();
        let out = work(self);
        self.paused += start.elapsed().as_secs_f64();
        out
    }

    /// The rest of the current epoch; `Some` when the run stops (a stop at the epoch's last
    /// step ends the epoch first).
    pub fn epoch(&mut self) -> Result<Option<Stop>, String> {
        self.bars.steps.reset();
        self.bars.steps.set_position(self.state.step_in_epoch);
        let batches = self.train_loader(self.state.epoch, self.state.step_in_epoch);
        for batch in batches.iter() {
            self.step(batch.map_err(|e| e.to_string())?)?;
            let stop = self.stop();
            let epoch_done = self.state.step_in_epoch as usize == self.steps_per_epoch;
            if !epoch_done {
                self.check_point()?;
            }
            if stop.is_some()
                || epoch_done
                || self
                    .state
                    .global_step
                    .is_multiple_of(self.setup.args.log_every.max(1))
            {
                self.log_point()?;
            }
            if let Some(stop) = stop {
                if epoch_done {
                    self.end_epoch()?;
                }
                return Ok(Some(stop));
            }
        }
        self.end_epoch()?;
        Ok(None)
    }

    /// One optimizer step on `batch`: forward, backward (through the capture handle, which
    /// also keeps adaptive damping's period batch), all-reduce, update, BatchNorm averaging.
    pub fn step(&mut self, batch: Batch<B>) -> Result<(), String> {
        let traffic = hylo_optim::host::traffic();
        if self.state.global_step == 2 {
            output::fault_point("panic-at-step-2");
        }
        for bad in &batch.skipped {
            self.setup.log(&format!(
                "training sample skipped (--skip-bad-samples): {bad}"
            ));
        }
        self.lr = self.schedule.rate_at(self.state.global_step as usize);
        let starts_period = self.optim.starts_period();
        if starts_period {
            self.state.refresh = Some(RefreshPoint {
                epoch: self.state.epoch,
                step_in_epoch: self.state.step_in_epoch,
            });
        }
        let loss = self.model.loss(batch.clone(), &mut self.pending);
        // The period's first batch at the current weights: no capture, BatchNorm statistics
        // untouched.
        let objective = |m: &M, b: &Batch<B>| {
            hylo_models::batch_norm::with_frozen_statistics(|| m.objective(b.clone()))
        };
        let grads = self
            .setup
            .capture
            .gradients_with_loss(loss, &self.model, &batch, objective);
        let comm = self.setup.workers.comm.as_ref();
        let (grads, grad_bytes) = all_reduce_mean::<B, M>(grads, &self.model, comm);
        let model = self.optim.step(self.lr, self.model.clone(), grads);
        // The training loss counts the steps whose updates stand: a rejected period's steps
        // (this one included, whose loss was taken at the period's end) were undone.
        match self.optim.last_period() {
            Some(PeriodVerdict::Rejected { .. }) => self.pending.discard_period(),
            _ if starts_period => self.pending.open_period(&mut self.state.train),
            _ => {}
        }
        // BatchNorm statistics: every rank keeps the mean over the ranks.
        self.model = average_buffers::<B, M>(model, comm).0;
        self.after_step(grad_bytes)?;
        let moved = hylo_optim::host::traffic() - traffic;
        self.traffic_per_step.push(moved);
        self.state.global_step += 1;
        self.state.step_in_epoch += 1;
        if self.state.global_step == self.first_step + 1 {
            self.setup.log(&format!(
                "first step {:.2}s (on a GPU backend it includes compiling the kernels it uses \
                 for the first time)",
                self.wall() - self.wall_before
            ));
        }
        self.bars.steps.inc(1);
        Ok(())
    }

    /// What a step's outcome tells the log: a rejected period (and a stop after too many in a
    /// row), the bytes a distributed refresh moved. Nothing is read from the device.
    fn after_step(&mut self, grad_bytes: u64) -> Result<(), String> {
        let step = self.state.global_step;
        let damping = self.optim.damping().unwrap_or(f64::NAN);
        if let Some(PeriodVerdict::Rejected { before, after }) = self.optim.last_period() {
            self.setup.log(&format!(
                "step {step}: the refresh batch's loss went from {before:.4} to {after:.4} over \
                 the last period: period rejected (weights and momentum restored to its start), \
                 damping raised to {damping:.3e}, step-length factor {:.3}",
                self.optim.step_scale().unwrap_or(1.0)
            ));
            if let Some(failure) = self.optim.failure() {
                return Err(format!(
                    "step {step}: {failure}; training stopped, the last checkpoint is kept as it \
                     was (try a lower --lr)"
                ));
            }
        }
        if let Some(bytes) = self
            .optim
            .refresh_bytes()
            .filter(|_| self.setup.workers.distributed())
        {
            self.setup.log(&format!(
                "refresh at step {step}: all-gather {} B, broadcast {} B, all-reduce {} B \
                 (gradients: {grad_bytes} B every step)",
                bytes.all_gather, bytes.broadcast, bytes.all_reduce
            ));
        }
        Ok(())
    }

    /// Whether every rank stops after this step, and why.
    fn stop(&self) -> Option<Stop> {
        let args = self.setup.args;
        let local = local_stop(
            INTERRUPTED.load(Ordering::SeqCst),
            self.state.global_step,
            args.max_steps,
            self.wall(),
            args.time_budget,
        );
        joint_stop(self.setup.workers.any(local.is_some()), local)
    }

    /// Every `--log-every` steps, at the end of an epoch and on a stop: the training metrics and
    /// the skip counters are read from the device (the only reads of the loop), the progress
    /// bar updated and the watches checked.
    fn log_point(&mut self) -> Result<(), String> {
        self.pending.flush(&mut self.state.train);
        let train = &self.state.train;
        self.bars.steps.set_message(format!(
            "loss {:.4} {} {:.3}",
            train.loss(),
            if M::SEGMENTS { "dice" } else { "acc" },
            train.score()
        ));
        let step = self.state.global_step;
        let setup = self.setup;
        self.skips
            .check(&self.optim, step, &|l: &str| setup.log(l))?;
        self.divergence
            .check(train.loss(), step, self.optim.skips_non_finite())
    }

    /// Validates, records the epoch's row (log line on rank 0), checkpoints and publishes
    /// `metrics.csv` and the curves, and starts the next epoch.
    pub fn end_epoch(&mut self) -> Result<(), String> {
        let setup = self.setup;
        self.pending.commit_period(&mut self.state.train);
        let wall_s = self.wall();
        let val = self.paused(|run| run.recalibrate_and_validate(false))?;
        if setup.workers.distributed() {
            // Training loss and accuracy over every rank's shard.
            let t = &mut self.state.train;
            let mut sums = [t.loss_sum as f32, t.samples as f32, t.correct as f32];
            setup.workers.sum(&mut sums);
            (t.loss_sum, t.samples, t.correct) = (sums[0] as f64, sums[1] as u64, sums[2] as u64);
        }
        let state = &mut self.state;
        state.epoch += 1;
        let row = MetricsRow {
            epoch: state.epoch,
            step: state.global_step,
            wall_s,
            train_loss: state.train.loss(),
            train_score: state.train.score(),
            val_loss: val.loss(),
            val_score: val.score(),
            lr: self.lr,
            damping: self.optim.damping(),
            mode: self
                .optim
                .mode()
                .unwrap_or_else(|| format!("{:?}", setup.args.optim).to_lowercase()),
            step_scale: self.optim.step_scale(),
        };
        state.step_in_epoch = 0;
        state.train = Tally::default();
        state.wall_s = wall_s;
        state.rows.push(row.clone());
        let score = if M::SEGMENTS { "dice" } else { "acc" };
        setup.log(&format!(
            "epoch {} step {} wall {:.1}s train_loss {:.4} train_{score} {:.4} val_loss {:.4} \
             val_{score} {:.4} lr {:.4} mode {}",
            row.epoch,
            row.step,
            row.wall_s,
            row.train_loss,
            row.train_score,
            row.val_loss,
            row.val_score,
            row.lr,
            row.mode
        ));
        self.bars.epochs.inc(1);
        self.bars
            .epochs
            .set_message(format!("val {:.4}", row.val_score));
        self.last_val = Some((row.val_loss, row.val_score));
        self.rows.push(row);
        if setup.workers.writes() {
            // Checkpoint first (it holds every row), then metrics.csv: a kill between the two
            // is repaired on resume, which rewrites metrics.csv from the checkpoint.
            self.paused(|run| {
                run.checkpoint()?;
                output::fault_point("after-checkpoint");
                run.publish()
            })?;
        }
        Ok(())
    }

    fn checkpoint(&self) -> Result<(), String> {
        output::save_checkpoint(self.setup.args.out_dir(), &self.state, |paths| {
            self.model
                .clone()
                .save_file(paths.model(), &CheckpointRecorder::new())
                .map_err(|e| format!("{}: cannot save the model: {e}", paths.model().display()))?;
            self.optim.save(&paths.optimizer())
        })
    }

    /// Writes `metrics.csv` from the run's rows and redraws `curves.png` (rank 0, after the
    /// checkpoint).
    fn publish(&self) -> Result<(), String> {
        let out = self.setup.args.out_dir();
        output::write_metrics(&out.join("metrics.csv"), &self.state.rows, M::SEGMENTS)?;
        if let Err(e) = crate::plot::curves(&out.join("metrics.csv"), &out.join("curves.png")) {
            output::log(out, &format!("could not draw curves.png: {e}"));
        }
        Ok(())
    }

    /// The one exit: a run stopped early saves a checkpoint where it stands; the ranks check
    /// that they agree on the weights; the outcome carries the final validation.
    pub fn finish(mut self, stop: Stop) -> Result<Outcome, String> {
        let setup = self.setup;
        if stop != Stop::Finished {
            self.state.wall_s = self.wall();
            self.pending.commit_period(&mut self.state.train);
            if setup.workers.writes() {
                self.checkpoint()?;
                self.publish()?;
            }
            self.last_val = None;
        }
        let final_val = match self.last_val {
            Some(val) => val,
            None => {
                let val = self.recalibrate_and_validate(false)?;
                (val.loss(), val.score())
            }
        };
        setup
            .workers
            .agree::<B, M>(&self.model, &|l: &str| setup.log(l))?;
        if stop != Stop::Finished {
            setup.log(&format!(
                "stopped ({stop:?}) at epoch {} step {}; checkpoint saved",
                self.state.epoch, self.state.global_step
            ));
        }
        self.bars.all.clear().ok();
        Ok(Outcome {
            stop,
            state: self.state,
            rows: self.rows,
            final_val,
            summary: None,
            traffic_per_step: self.traffic_per_step,
            checks: self.checks,
        })
    }
}
