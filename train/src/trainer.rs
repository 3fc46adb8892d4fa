//! The training loop: epochs of batches, validation, metrics, checkpoints, resume and stops.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use hylo_datasets::{loader, EpochOrder, SampleBatcher};
use hylo_optim::schedule::WarmupMultiStepConfig;
use hylo_optim::CaptureHandle;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::cli::TrainArgs;
use crate::data::DataSources;
use crate::optimizers::{AnyOptimizer, CheckpointRecorder};
use crate::output::{self, MetricsRow, RunState};
use crate::task::{Tally, TrainModel};

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
}

/// Set by the Ctrl-C handler; the trainer saves and stops at the next step.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Trains `model` on `data` as `args` say, writing into `args.out`; `resume` continues the
/// checkpoint found there. `command` (`classify`/`segment`) goes into `config.json`.
pub fn train<B, M>(
    args: &TrainArgs,
    command: &str,
    data: &DataSources,
    model: M,
    capture: &CaptureHandle,
    device: &B::Device,
    resume: bool,
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
    let mut optim = AnyOptimizer::<M, B>::build(args, steps_per_epoch, capture)?;
    let (mut model, mut state) = if resume {
        let (paths, state) = output::find_checkpoint(out)?;
        let recorder = CheckpointRecorder::new();
        let model = model
            .load_file(paths.model(), &recorder, device)
            .map_err(|e| format!("{}: cannot load the model: {e}", paths.model().display()))?;
        optim = optim.load(&paths.optimizer(), device)?;
        output::log(
            out,
            &format!(
                "resumed at epoch {} step {}",
                state.epoch, state.global_step
            ),
        );
        (model, state)
    } else {
        std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
        let _ = std::fs::remove_file(out.join("train.log"));
        output::write_config(out, args, command)?;
        output::create_metrics(&out.join("metrics.csv"), M::SEGMENTS)?;
        (model, RunState::default())
    };
    let spe = steps_per_epoch;
    let schedule = WarmupMultiStepConfig::new(args.lr)
        .with_warmup_steps(args.warmup_epochs as usize * spe)
        .with_milestones(args.milestones.iter().map(|&m| m as usize * spe).collect())
        .with_decay(args.lr_decay)
        .init()
        .map_err(|e| e.to_string())?;
    let train_batcher =
        SampleBatcher::new(data.train.clone(), data.normalization.clone(), args.seed);
    let val_batcher = SampleBatcher::new(data.val.clone(), data.normalization.clone(), args.seed);

    let bars = MultiProgress::new();
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
    while state.epoch < args.epochs {
        let order = EpochOrder::new(train_len, batch_size, args.seed, state.epoch, true, true)
            .skip_batches(state.step_in_epoch as usize, batch_size);
        step_bar.reset();
        step_bar.set_position(state.step_in_epoch);
        for batch in loader::<B>(train_batcher.clone(), order, batch_size, device).iter() {
            let batch = batch.map_err(|e| e.to_string())?;
            lr = schedule.rate_at(state.global_step as usize);
            let loss = model.loss(batch, &mut state.train);
            let grads = capture.gradients(loss.backward(), &model);
            model = optim.step(lr, model, grads);
            if optim.last_step_skipped() {
                output::log(
                    out,
                    &format!(
                        "step {}: non-finite gradient or curvature, step skipped",
                        state.global_step
                    ),
                );
            }
            state.global_step += 1;
            state.step_in_epoch += 1;
            step_bar.inc(1);
            step_bar.set_message(format!(
                "loss {:.4} {} {:.3}",
                state.train.loss(),
                if M::SEGMENTS { "dice" } else { "acc" },
                state.train.score()
            ));
            let stop = if INTERRUPTED.load(Ordering::SeqCst) {
                Some(Stop::Interrupted)
            } else if args.max_steps.is_some_and(|m| state.global_step >= m) {
                Some(Stop::MaxSteps)
            } else if args.time_budget.is_some_and(|t| wall(&started) >= t) {
                Some(Stop::TimeBudget)
            } else {
                None
            };
            if let Some(stop) = stop {
                if state.step_in_epoch as usize == spe {
                    // The epoch is complete: finish it normally first.
                    let row = end_epoch::<B, M>(
                        args,
                        data,
                        &val_batcher,
                        &model,
                        &optim,
                        &mut state,
                        lr,
                        wall(&started),
                        device,
                    )?;
                    rows.push(row);
                }
                state.wall_s = wall(&started);
                checkpoint(out, &state, &model, &optim)?;
                let final_val = validate::<B, M>(data, &val_batcher, &model, batch_size, device);
                output::log(
                    out,
                    &format!(
                        "stopped ({stop:?}) at epoch {} step {}; checkpoint saved",
                        state.epoch, state.global_step
                    ),
                );
                bars.clear().ok();
                return Ok(Outcome {
                    stop,
                    state,
                    rows,
                    final_val: (final_val.loss(), final_val.score()),
                });
            }
        }
        let row = end_epoch::<B, M>(
            args,
            data,
            &val_batcher,
            &model,
            &optim,
            &mut state,
            lr,
            wall(&started),
            device,
        )?;
        epoch_bar.inc(1);
        epoch_bar.set_message(format!("val {:.4}", row.val_score));
        let final_val = (row.val_loss, row.val_score);
        rows.push(row);
        checkpoint(out, &state, &model, &optim)?;
        if state.epoch == args.epochs {
            bars.clear().ok();
            return Ok(Outcome {
                stop: Stop::Finished,
                state,
                rows,
                final_val,
            });
        }
    }
    bars.clear().ok();
    let val = validate::<B, M>(data, &val_batcher, &model, batch_size, device);
    Ok(Outcome {
        stop: Stop::Finished,
        state,
        rows,
        final_val: (val.loss(), val.score()),
    })
}

/// Validates, writes the epoch's row, the log line and the curves, and starts the next epoch.
#[allow(clippy::too_many_arguments)]
fn end_epoch<B: AutodiffBackend, M: TrainModel<B>>(
    args: &TrainArgs,
    data: &DataSources,
    val_batcher: &SampleBatcher,
    model: &M,
    optim: &AnyOptimizer<M, B>,
    state: &mut RunState,
    lr: f64,
    wall_s: f64,
    device: &B::Device,
) -> Result<MetricsRow, String> {
    let val = validate::<B, M>(data, val_batcher, model, args.batch_size as usize, device);
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
    let out = args.out.as_path();
    output::append_metrics(&out.join("metrics.csv"), &row)?;
    output::log(
        out,
        &format!(
            "epoch {} step {} wall {:.1}s train_loss {:.4} train_{} {:.4} val_loss {:.4} val_{} {:.4} lr {:.4} mode {}",
            row.epoch, row.step, row.wall_s, row.train_loss, score_name::<B, M>(), row.train_score,
            row.val_loss, score_name::<B, M>(), row.val_score, row.lr, row.mode
        ),
    );
    if let Err(e) = crate::plot::curves(&out.join("metrics.csv"), &out.join("curves.png")) {
        output::log(out, &format!("could not draw curves.png: {e}"));
    }
    Ok(row)
}

fn score_name<B: AutodiffBackend, M: TrainModel<B>>() -> &'static str {
    if M::SEGMENTS {
        "dice"
    } else {
        "acc"
    }
}

/// Loss and score of `model` on the validation set.
pub fn validate<B: AutodiffBackend, M: TrainModel<B>>(
    data: &DataSources,
    batcher: &SampleBatcher,
    model: &M,
    batch_size: usize,
    device: &B::Device,
) -> Tally {
    let valid = model.valid();
    let mut tally = Tally::default();
    let order = EpochOrder::new(data.val.len(), batch_size, 0, 0, false, false);
    for batch in loader::<B::InnerBackend>(batcher.clone(), order, batch_size, device).iter() {
        match batch {
            Ok(batch) => M::evaluate(&valid, batch, data.volume_of.as_ref(), &mut tally),
            Err(e) => tracing::error!("validation batch skipped: {e}"),
        }
    }
    tally
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
