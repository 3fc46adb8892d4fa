//! The training loop: epochs of batches, validation, metrics, checkpoints, resume and stops.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use hylo_datasets::{loader, EpochOrder, SampleBatcher};
use hylo_optim::schedule::WarmupMultiStepConfig;
use hylo_optim::{CaptureHandle, PeriodVerdict};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::cli::TrainArgs;
use crate::data::DataSources;
use crate::optimizers::{AnyOptimizer, CheckpointRecorder};
use crate::output::{self, MetricsRow, RunState};
use crate::task::{PendingTally, Tally, TrainModel};
use crate::workers::Workers;
use hylo_optim::comm::{all_reduce_mean, average_buffers};

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
    let out = args.out.as_path();
    let batch_size = args.batch_size as usize;
    let train_len = data.train.len();
    let steps_per_epoch = train_len / batch_size;
    if steps_per_epoch == 0 {
        return Err(format!(
            "--batch-size {batch_size} is larger than the training set ({train_len} samples)"
        ));
    }
    let (rank, size) = (workers.rank(), workers.size());
    if !batch_size.is_multiple_of(size) {
        return Err(format!(
            "--batch-size {batch_size} must be a multiple of the {size} ranks"
        ));
    }
    let local_batch = batch_size / size;
    workers.check_same_config(&serde_json::to_string(args).map_err(|e| e.to_string())?)?;
    let log = |line: &str| {
        if workers.writes() {
            output::log(out, line);
        }
    };
    let mut optim = AnyOptimizer::<M, B>::build(args, steps_per_epoch, capture, workers)?;
    let (mut model, mut state) = if resume {
        let (paths, mut state) = output::find_checkpoint(out)?;
        if workers.writes() {
            restore_metrics(out, &mut state, M::SEGMENTS)?;
        }
        let recorder = CheckpointRecorder::new();
        let model = model
            .load_file(paths.model(), &recorder, device)
            .map_err(|e| format!("{}: cannot load the model: {e}", paths.model().display()))?;
        optim = optim.load(&paths.optimizer(), device)?;
        log(&format!(
            "resumed at epoch {} step {}",
            state.epoch, state.global_step
        ));
        (model, state)
    } else {
        if workers.writes() {
            std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
            let _ = std::fs::remove_file(out.join("train.log"));
            output::write_config(out, args, command)?;
            output::write_metrics(&out.join("metrics.csv"), &[], M::SEGMENTS)?;
        }
        (model, RunState::default())
    };
    log(&format!(
        "device {}",
        crate::device::describe(args.device()?)?
    ));
    if workers.distributed() {
        log(&format!(
            "data parallel over {size} ranks: local batch {local_batch} of {batch_size}"
        ));
    }
    let spe = steps_per_epoch;
    let schedule = WarmupMultiStepConfig::new(args.lr)
        .with_warmup_steps(args.warmup_epochs as usize * spe)
        .with_milestones(args.milestones.iter().map(|&m| m as usize * spe).collect())
        .with_decay(args.lr_decay)
        .init()
        .map_err(|e| e.to_string())?;
    let train_batcher =
        SampleBatcher::new(data.train.clone(), data.normalization.clone(), args.seed)
            .skip_bad(args.skip_bad_samples);
    let val_batcher = SampleBatcher::new(data.val.clone(), data.normalization.clone(), args.seed)
        .skip_bad(args.skip_bad_samples);
    let epoch_end = EpochEnd {
        args,
        data,
        val_batcher: &val_batcher,
        device,
        workers,
    };

    let bars = MultiProgress::new();
    if !workers.writes() {
        bars.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let epoch_bar = bars.add(ProgressBar::new(args.epochs).with_position(state.epoch));
    epoch_bar
        .set_style(ProgressStyle::with_template("epoch {pos}/{len} {wide_bar} {msg}").unwrap());
    let step_bar = bars.add(ProgressBar::new(spe as u64));
    step_bar.set_style(
        ProgressStyle::with_template("step {pos}/{len} {bar:30} {per_sec} {msg}").unwrap(),
    );

    let started = Instant::now();
    let wall_before = state.wall_s;
    let wall = |started: &Instant| wall_before + started.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    let mut lr = schedule.rate_at(state.global_step as usize);
    let mut pending = PendingTally::<B::InnerBackend>::default();
    let first_step = state.global_step;
    // This rank's batches of an epoch (shuffled, augmented), from batch `skip` on.
    let epoch_order = |epoch: u64, skip: u64| {
        EpochOrder::sharded(
            train_len, batch_size, args.seed, epoch, true, true, rank, size,
        )
        .skip_batches(skip as usize, local_batch)
    };
    // Adaptive damping: the last refresh batch (rebuilt from `state.refresh` after a resume).
    let mut refresh_batch: Option<hylo_datasets::Batch<B>> = None;
    let mut skips = SkipWatch {
        seen: optim.skipped_steps().0,
        limit: args.max_consecutive_skips,
    };
    let mut divergence = DivergenceWatch::default();
    while state.epoch < args.epochs {
        let order = epoch_order(state.epoch, state.step_in_epoch);
        step_bar.reset();
        step_bar.set_position(state.step_in_epoch);
        for batch in loader::<B>(train_batcher.clone(), order, local_batch, device).iter() {
            let batch = batch.map_err(|e| e.to_string())?;
            if state.global_step == 2 {
                output::fault_point("panic-at-step-2");
            }
            for bad in &batch.skipped {
                log(&format!(
                    "training sample skipped (--skip-bad-samples): {bad}"
                ));
            }
            lr = schedule.rate_at(state.global_step as usize);
            if optim.wants_loss_change() {
                // Adaptive damping, before the refresh about to happen: the last refresh batch at
                // the current weights (no capture, BatchNorm statistics untouched; the ranks
                // average their local losses).
                if let Some(point) = state.refresh.take() {
                    let kept = match refresh_batch.take() {
                        Some(kept) => kept,
                        None => {
                            let order = epoch_order(point.epoch, point.step_in_epoch);
                            loader::<B>(train_batcher.clone(), order, local_batch, device)
                                .iter()
                                .next()
                                .ok_or("the last refresh batch is past its epoch's end")?
                                .map_err(|e| e.to_string())?
                        }
                    };
                    let armed = capture.is_armed();
                    capture.arm(false);
                    let after = hylo_models::batch_norm::with_frozen_statistics(|| {
                        model.objective(kept).inner()
                    });
                    capture.arm(armed);
                    let after = if workers.distributed() {
                        scalar_on(mean_over_ranks(workers, after), device)
                    } else {
                        after
                    };
                    optim.observe_loss_change(&model, scalar_on(point.loss, device), after);
                }
            }
            let kept = optim.starts_period().then(|| batch.clone());
            let loss = model.loss(batch, &mut pending);
            if let Some(kept) = kept {
                // Read now so that a checkpoint can keep it (one read per refresh).
                state.refresh = Some(output::RefreshPoint {
                    epoch: state.epoch,
                    step_in_epoch: state.step_in_epoch,
                    loss: mean_over_ranks(workers, loss.clone().inner()),
                });
                refresh_batch = Some(kept);
            }
            let grads = capture.gradients(loss.backward(), &model);
            let (grads, grad_bytes) = all_reduce_mean::<B, M>(grads, &model, workers.comm.as_ref());
            model = optim.step(lr, model, grads);
            // BatchNorm statistics: every rank keeps the mean over the ranks.
            model = average_buffers::<B, M>(model, workers.comm.as_ref()).0;
            if let Some(PeriodVerdict::Rejected { before, after }) = optim.last_period() {
                log(&format!(
                    "step {}: the refresh batch's loss went from {before:.4} to {after:.4} over \
                     the last period: period rejected (weights and momentum restored to its \
                     start), damping raised to {:.3e}",
                    state.global_step,
                    optim.damping().unwrap_or(f64::NAN)
                ));
                if optim.consecutive_rejections() >= MAX_CONSECUTIVE_REJECTIONS {
                    return Err(format!(
                        "adaptive damping rejected the last {} periods in a row (up to step {}): \
                         the loss blows up even at damping {:.3e}; training stopped, the last \
                         checkpoint is kept as it was (try a lower --lr)",
                        MAX_CONSECUTIVE_REJECTIONS,
                        state.global_step,
                        optim.damping().unwrap_or(f64::NAN)
                    ));
                }
            }
            if let Some(bytes) = optim.refresh_bytes().filter(|_| workers.distributed()) {
                log(&format!(
                    "refresh at step {}: all-gather {} B, broadcast {} B, all-reduce {} B \
                     (gradients: {grad_bytes} B every step)",
                    state.global_step, bytes.all_gather, bytes.broadcast, bytes.all_reduce
                ));
            }
            state.global_step += 1;
            state.step_in_epoch += 1;
            if state.global_step == first_step + 1 {
                log(&format!(
                    "first step {:.2}s (on a GPU backend it includes compiling the kernels \
                     it uses for the first time)",
                    wall(&started) - wall_before
                ));
            }
            step_bar.inc(1);
            let local_stop = if INTERRUPTED.load(Ordering::SeqCst) {
                Some(Stop::Interrupted)
            } else if args.max_steps.is_some_and(|m| state.global_step >= m) {
                Some(Stop::MaxSteps)
            } else if args.time_budget.is_some_and(|t| wall(&started) >= t) {
                Some(Stop::TimeBudget)
            } else {
                None
            };
            // Every rank stops at the same step: a rank left alone in a collective would hang.
            let stop = match (workers.any(local_stop.is_some()), local_stop) {
                (true, Some(stop)) => Some(stop),
                (true, None) => Some(Stop::Interrupted),
                (false, _) => None,
            };
            // Metrics and the skip counters are read from the device only here (every
            // --log-every steps, at the end of an epoch and on a stop).
            let epoch_done = state.step_in_epoch as usize == spe;
            if stop.is_some() || epoch_done || state.global_step % args.log_every.max(1) == 0 {
                pending.flush(&mut state.train);
                step_bar.set_message(format!(
                    "loss {:.4} {} {:.3}",
                    state.train.loss(),
                    if M::SEGMENTS { "dice" } else { "acc" },
                    state.train.score()
                ));
                skips.check(&optim, state.global_step, &log)?;
                divergence.check(
                    state.train.loss(),
                    state.global_step,
                    optim.skips_non_finite(),
                )?;
            }
            if let Some(stop) = stop {
                if epoch_done {
                    // The epoch is complete: finish it normally first.
                    let row = epoch_end.run(&model, &optim, &mut state, lr, wall(&started))?;
                    rows.push(row);
                }
                state.wall_s = wall(&started);
                if workers.writes() {
                    checkpoint(out, &state, &model, &optim)?;
                    epoch_end.publish(&state)?;
                }
                let final_val =
                    validate::<B, M>(data, &val_batcher, &model, batch_size, device, &log)?;
                agree(workers, &model, &log)?;
                log(&format!(
                    "stopped ({stop:?}) at epoch {} step {}; checkpoint saved",
                    state.epoch, state.global_step
                ));
                bars.clear().ok();
                return Ok(Outcome {
                    stop,
                    state,
                    rows,
                    final_val: (final_val.loss(), final_val.score()),
                    summary: None,
                });
            }
        }
        let row = epoch_end.run(&model, &optim, &mut state, lr, wall(&started))?;
        epoch_bar.inc(1);
        epoch_bar.set_message(format!("val {:.4}", row.val_score));
        let final_val = (row.val_loss, row.val_score);
        rows.push(row);
        if workers.writes() {
            // Checkpoint first (it holds every row), then metrics.csv: a kill between the two
            // is repaired on resume, which rewrites metrics.csv from the checkpoint.
            checkpoint(out, &state, &model, &optim)?;
            output::fault_point("after-checkpoint");
            epoch_end.publish(&state)?;
        }
        if state.epoch == args.epochs {
            agree(workers, &model, &log)?;
            bars.clear().ok();
            return Ok(Outcome {
                stop: Stop::Finished,
                state,
                rows,
                final_val,
                summary: None,
            });
        }
    }
    bars.clear().ok();
    let val = validate::<B, M>(data, &val_batcher, &model, batch_size, device, &log)?;
    Ok(Outcome {
        stop: Stop::Finished,
        state,
        rows,
        final_val: (val.loss(), val.score()),
        summary: None,
    })
}

/// The mean over the ranks of a scalar (one host read, and one all-reduce when distributed).
fn mean_over_ranks<I: burn::tensor::backend::Backend>(
    workers: &Workers,
    value: burn::tensor::Tensor<I, 1>,
) -> f64 {
    let mut host = hylo_optim::host::read_f32(value);
    workers.sum(&mut host);
    f64::from(host[0]) / workers.size() as f64
}

/// A scalar as a one-element tensor.
fn scalar_on<I: burn::tensor::backend::Backend>(
    value: f64,
    device: &I::Device,
) -> burn::tensor::Tensor<I, 1> {
    burn::tensor::Tensor::from_floats([value as f32], device)
}

/// Periods rejected in a row by adaptive damping after which the run stops.
pub const MAX_CONSECUTIVE_REJECTIONS: usize = 5;

/// The training loss (its epoch-to-date mean at the loop's log points) may not grow beyond this
/// factor times its first value: the run stops with an error instead of training on.
pub const MAX_LOSS_GROWTH: f64 = 10.0;

/// Stops a run whose training loss blows up: its epoch-to-date mean at a log point above
/// [`MAX_LOSS_GROWTH`] times the first one, or not finite with an optimizer that does not skip
/// non-finite steps (Burn's SGD and Adam; ours skip them and [`SkipWatch`] counts them).
#[derive(Default)]
struct DivergenceWatch {
    first: Option<f64>,
}

impl DivergenceWatch {
    fn check(&mut self, loss: f64, step: u64, skips_non_finite: bool) -> Result<(), String> {
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
        Ok(())
    }
}

/// Skipped updates (NaN or Inf in the gradients), read at the loop's log points: logs new ones
/// and stops the run after `limit` consecutive skips.
struct SkipWatch {
    seen: u64,
    limit: u64,
}

impl SkipWatch {
    fn check<M: AutodiffModule<B>, B: AutodiffBackend>(
        &mut self,
        optim: &AnyOptimizer<M, B>,
        step: u64,
        log: &impl Fn(&str),
    ) -> Result<(), String> {
        let (total, consecutive) = optim.skipped_steps();
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

/// What the end of an epoch needs besides the model and the optimizer.
struct EpochEnd<'a, B: AutodiffBackend> {
    args: &'a TrainArgs,
    data: &'a DataSources,
    val_batcher: &'a SampleBatcher,
    device: &'a B::Device,
    workers: &'a Workers,
}

impl<B: AutodiffBackend> EpochEnd<'_, B> {
    /// Validates, writes the epoch's row, the log line and the curves (rank 0), and starts the
    /// next epoch.
    fn run<M: TrainModel<B>>(
        &self,
        model: &M,
        optim: &AnyOptimizer<M, B>,
        state: &mut RunState,
        lr: f64,
        wall_s: f64,
    ) -> Result<MetricsRow, String> {
        let args = self.args;
        let log = |line: &str| {
            if self.workers.writes() {
                output::log(args.out.as_path(), line);
            }
        };
        let val = validate::<B, M>(
            self.data,
            self.val_batcher,
            model,
            args.batch_size as usize,
            self.device,
            &log,
        )?;
        if self.workers.distributed() {
            // Training loss and accuracy over every rank's shard.
            let t = &mut state.train;
            let mut sums = [t.loss_sum as f32, t.samples as f32, t.correct as f32];
            self.workers.sum(&mut sums);
            (t.loss_sum, t.samples, t.correct) = (sums[0] as f64, sums[1] as u64, sums[2] as u64);
        }
        state.epoch += 1;
        let row = MetricsRow {
            epoch: state.epoch,
            step: state.global_step,
            wall_s,
            train_loss: state.train.loss(),
            train_score: state.train.score(),
            val_loss: val.loss(),
            val_score: val.score(),
            lr,
            damping: optim.damping(),
            mode: optim
                .mode()
                .unwrap_or_else(|| format!("{:?}", args.optim).to_lowercase()),
        };
        state.step_in_epoch = 0;
        state.train = Tally::default();
        state.wall_s = wall_s;
        state.rows.push(row.clone());
        if !self.workers.writes() {
            return Ok(row);
        }
        let out = args.out.as_path();
        let score = if M::SEGMENTS { "dice" } else { "acc" };
        output::log(
            out,
            &format!(
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
            ),
        );
        Ok(row)
    }

    /// Writes `metrics.csv` from the run's rows and redraws `curves.png` (rank 0, after the
    /// checkpoint).
    fn publish(&self, state: &RunState) -> Result<(), String> {
        let out = self.args.out.as_path();
        let segments = self.args.dataset.is_segmentation();
        output::write_metrics(&out.join("metrics.csv"), &state.rows, segments)?;
        if let Err(e) = crate::plot::curves(&out.join("metrics.csv"), &out.join("curves.png")) {
            output::log(out, &format!("could not draw curves.png: {e}"));
        }
        Ok(())
    }
}

/// On resume: `metrics.csv` becomes the checkpoint's rows (a run killed after its checkpoint and
/// before its metrics gets the missing row back; one killed before gets no duplicate). A
/// checkpoint from before rows were saved keeps the file's first `epoch` rows.
fn restore_metrics(out: &Path, state: &mut RunState, segments: bool) -> Result<(), String> {
    let path = out.join("metrics.csv");
    if state.rows.len() as u64 != state.epoch {
        let mut rows = output::read_metrics(&path)?;
        rows.truncate(state.epoch as usize);
        if rows.len() as u64 != state.epoch {
            return Err(format!(
                "{}: {} rows, but the checkpoint is at epoch {}",
                path.display(),
                rows.len(),
                state.epoch
            ));
        }
        state.rows = rows;
    }
    output::write_metrics(&path, &state.rows, segments)
}

/// In a distributed run, checks that every rank ends with the same weights and logs it.
fn agree<B: AutodiffBackend, M: AutodiffModule<B>>(
    workers: &Workers,
    model: &M,
    log: &impl Fn(&str),
) -> Result<(), String> {
    if workers.distributed() {
        let hash = workers.check_same_weights::<B, M>(model)?;
        log(&format!(
            "all {} ranks agree on the weights (bitwise hash {hash:016x})",
            workers.size()
        ));
    }
    Ok(())
}

/// Loss and score of `model` on the validation set (one host read at the end); a sample that
/// cannot be read fails it with the file's name, unless the batcher skips such samples (then
/// each is logged through `log`).
pub fn validate<B: AutodiffBackend, M: TrainModel<B>>(
    data: &DataSources,
    batcher: &SampleBatcher,
    model: &M,
    batch_size: usize,
    device: &B::Device,
    log: &impl Fn(&str),
) -> Result<Tally, String> {
    let valid = model.valid();
    let mut pending = PendingTally::default();
    let order = EpochOrder::new(data.val.len(), batch_size, 0, 0, false, false);
    for batch in loader::<B::InnerBackend>(batcher.clone(), order, batch_size, device).iter() {
        let batch = batch.map_err(|e| format!("validation: {e}"))?;
        for bad in &batch.skipped {
            log(&format!(
                "validation sample skipped (--skip-bad-samples): {bad}"
            ));
        }
        M::evaluate(&valid, batch, data.volume_of.as_ref(), &mut pending);
    }
    let mut tally = Tally::default();
    pending.flush(&mut tally);
    Ok(tally)
}

fn checkpoint<B: AutodiffBackend, M: AutodiffModule<B>>(
    out: &Path,
    state: &RunState,
    model: &M,
    optim: &AnyOptimizer<M, B>,
) -> Result<(), String> {
    output::save_checkpoint(out, state, |paths| {
        model
            .clone()
            .save_file(paths.model(), &CheckpointRecorder::new())
            .map_err(|e| format!("{}: cannot save the model: {e}", paths.model().display()))?;
        optim.save(&paths.optimizer())
    })
}
