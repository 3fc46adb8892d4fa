//! Run outputs: `config.json`, `metrics.csv`, `train.log`, and the checkpoint directory.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cli::TrainArgs;
use crate::task::Tally;

/// One row of `metrics.csv`: one per completed epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricsRow {
    /// Epochs completed (1-based).
    pub epoch: u64,
    /// Optimizer steps so far.
    pub step: u64,
    /// Seconds of training so far (across resumes).
    pub wall_s: f64,
    /// Mean training loss of the epoch's steps whose updates stand (a period that adaptive
    /// damping rejected, its updates undone, is left out).
    pub train_loss: f64,
    /// Training accuracy (classification) or Dice (segmentation) of the epoch.
    #[serde(alias = "train_acc", alias = "train_dice")]
    pub train_score: f64,
    /// Validation loss.
    pub val_loss: f64,
    /// Validation accuracy, or per-volume Dice.
    #[serde(alias = "val_acc", alias = "val_dice")]
    pub val_score: f64,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Damping (natural-gradient optimizers), else empty.
    pub damping: Option<f64>,
    /// HyLo's mode (kid/kis), or the optimizer's name.
    pub mode: String,
    /// The step-length factor of the natural-gradient optimizers' trust region at the epoch's
    /// end, else empty (and in files written before the column existed).
    #[serde(default)]
    pub step_scale: Option<f64>,
}

/// Header of `metrics.csv`; segmentation runs name the score `dice`.
pub fn header(segments: bool) -> Vec<&'static str> {
    let (train, val) = if segments {
        ("train_dice", "val_dice")
    } else {
        ("train_acc", "val_acc")
    };
    vec![
        "epoch",
        "step",
        "wall_s",
        "train_loss",
        train,
        "val_loss",
        val,
        "lr",
        "damping",
        "mode",
        "step_scale",
    ]
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

/// Writes `metrics.csv` with its header and `rows`, atomically (a temporary file, synced to
/// disk, then renamed over the old one): an interruption leaves the old file or the new one.
pub fn write_metrics(path: &Path, rows: &[MetricsRow], segments: bool) -> Result<(), String> {
    let tmp = path.with_extension("csv.tmp");
    {
        let mut w = csv::WriterBuilder::new()
            .has_headers(false)
            .from_path(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        w.write_record(header(segments))
            .map_err(|e| io_err(&tmp, e))?;
        for row in rows {
            w.serialize(row).map_err(|e| io_err(&tmp, e))?;
        }
        w.flush().map_err(|e| io_err(&tmp, e))?;
    }
    sync_file(&tmp)?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Forces a file's contents to disk.
fn sync_file(path: &Path) -> Result<(), String> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err(path, e))
}

/// Forces a directory's entries (created, renamed files) to disk.
fn sync_dir(dir: &Path) -> Result<(), String> {
    // Directories cannot be synced on every platform; where they can (Linux), errors matter.
    match fs::File::open(dir) {
        Ok(f) => f.sync_all().or_else(|e| {
            if e.kind() == std::io::ErrorKind::InvalidInput {
                Ok(())
            } else {
                Err(io_err(dir, e))
            }
        }),
        Err(e) => Err(io_err(dir, e)),
    }
}

/// Reads every row of a `metrics.csv`.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRow>, String> {
    let mut r = csv::Reader::from_path(path).map_err(|e| io_err(path, e))?;
    r.deserialize()
        .map(|row| row.map_err(|e| io_err(path, e)))
        .collect()
}

/// Appends a line to `train.log` and emits it through `tracing`.
pub fn log(out: &Path, line: &str) {
    tracing::info!("{line}");
    if let Ok(mut f) = OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("train.log"))
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Position of a run, saved with every checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Epochs completed.
    pub epoch: u64,
    /// Steps done in the current epoch (its batches are skipped on resume).
    pub step_in_epoch: u64,
    /// Optimizer steps so far (the learning-rate schedule's position).
    pub global_step: u64,
    /// Seconds of training so far.
    pub wall_s: f64,
    /// Training loss and score sums of the current epoch so far.
    pub train: Tally,
    /// Every `metrics.csv` row so far: on resume the file is rewritten from these, so a run
    /// killed between its checkpoint and its metrics has the same rows as one never killed.
    #[serde(default)]
    pub rows: Vec<MetricsRow>,
    /// Adaptive damping: where the first batch of the last curvature period was (the
    /// optimizer's record holds the rest of the period; on resume the batch is rebuilt from its
    /// position).
    #[serde(default)]
    pub refresh: Option<RefreshPoint>,
}

/// The position of the first batch of a curvature period.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefreshPoint {
    /// Epoch of the batch.
    pub epoch: u64,
    /// Its index in the epoch.
    pub step_in_epoch: u64,
}

/// Checkpoint files inside a directory.
pub struct CheckpointPaths {
    /// The directory.
    pub dir: PathBuf,
}

impl CheckpointPaths {
    /// The checkpoint of the run in `out` (`out/checkpoint`).
    pub fn of(out: &Path) -> Self {
        Self {
            dir: out.join("checkpoint"),
        }
    }

    /// Model record (the recorder adds `.bin`).
    pub fn model(&self) -> PathBuf {
        self.dir.join("model")
    }

    /// Optimizer record (the recorder adds `.bin`).
    pub fn optimizer(&self) -> PathBuf {
        self.dir.join("optimizer")
    }

    /// Run position.
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
}

/// Writes a checkpoint atomically and durably: `write` fills a temporary directory, whose files
/// and entries are synced to disk before it replaces `out/checkpoint` by renames (the parent is
/// synced after), so an interruption or a power loss leaves the old or the new one whole.
pub fn save_checkpoint(
    out: &Path,
    state: &RunState,
    write: impl FnOnce(&CheckpointPaths) -> Result<(), String>,
) -> Result<(), String> {
    let tmp = CheckpointPaths {
        dir: out.join("checkpoint.tmp"),
    };
    let _ = fs::remove_dir_all(&tmp.dir);
    fs::create_dir_all(&tmp.dir).map_err(|e| io_err(&tmp.dir, e))?;
    write(&tmp)?;
    let json = serde_json::to_string_pretty(state).map_err(|e| e.to_string())?;
    fs::write(tmp.state(), json).map_err(|e| io_err(&tmp.state(), e))?;
    for entry in fs::read_dir(&tmp.dir).map_err(|e| io_err(&tmp.dir, e))? {
        let path = entry.map_err(|e| io_err(&tmp.dir, e))?.path();
        sync_file(&path)?;
    }
    sync_dir(&tmp.dir)?;
    let live = CheckpointPaths::of(out).dir;
    let old = out.join("checkpoint.old");
    let _ = fs::remove_dir_all(&old);
    if live.exists() {
        fs::rename(&live, &old).map_err(|e| io_err(&live, e))?;
    }
    fs::rename(&tmp.dir, &live).map_err(|e| io_err(&live, e))?;
    sync_dir(out)?;
    let _ = fs::remove_dir_all(&old);
    Ok(())
}

/// The checkpoint to resume from (falls back to `checkpoint.old` after an interrupted swap).
pub fn find_checkpoint(out: &Path) -> Result<(CheckpointPaths, RunState), String> {
    for dir in [out.join("checkpoint"), out.join("checkpoint.old")] {
        let paths = CheckpointPaths { dir };
        if let Ok(text) = fs::read_to_string(paths.state()) {
            let state = serde_json::from_str(&text)
                .map_err(|e| format!("{}: not a run state: {e}", paths.state().display()))?;
            return Ok((paths, state));
        }
    }
    Err(format!(
        "{}: no checkpoint to resume (expected checkpoint/state.json)",
        out.display()
    ))
}

/// A fault-injection point for the crash tests: when the environment variable `HYLO_FAULT`
/// names `point`, the process aborts here, as a kill at that moment would (`panic-*` points
/// panic instead, as a bug would).
pub fn fault_point(point: &str) {
    if std::env::var("HYLO_FAULT").is_ok_and(|p| p == point) {
        if point.starts_with("panic") {
            panic!("HYLO_FAULT={point}");
        }
        eprintln!("HYLO_FAULT={point}: aborting");
        std::process::abort();
    }
}

/// Writes `config.json`.
pub fn write_config(out: &Path, args: &TrainArgs, command: &str) -> Result<(), String> {
    let path = out.join("config.json");
    let json = serde_json::json!({ "command": command, "args": args });
    fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).map_err(|e| io_err(&path, e))
}

/// Reads `config.json` of a run: its command (`classify`/`segment`) and arguments.
pub fn read_config(out: &Path) -> Result<(String, TrainArgs), String> {
    let path = out.join("config.json");
    let text = fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
    #[derive(Deserialize)]
    struct Saved {
        command: String,
        args: TrainArgs,
    }
    let saved: Saved =
        serde_json::from_str(&text).map_err(|e| io_err(&path, format!("not a run config: {e}")))?;
    Ok((saved.command, saved.args))
}

/// On resume: `metrics.csv` becomes the checkpoint's rows (a run killed after its checkpoint and
/// before its metrics gets the missing row back; one killed before gets no duplicate). A
/// checkpoint from before rows were saved keeps the file's first `epoch` rows.
pub fn restore_metrics(out: &Path, state: &mut RunState, segments: bool) -> Result<(), String> {
    let path = out.join("metrics.csv");
    if state.rows.len() as u64 != state.epoch {
        let mut rows = read_metrics(&path)?;
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
    write_metrics(&path, &state.rows, segments)
}
