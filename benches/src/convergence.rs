//! The convergence benchmark: tasks where SGD needs several epochs to reach a target, each
//! optimizer run with its `hylo-train` defaults and over a small grid of (learning rate,
//! damping), with several seeds; per task and optimizer the best validation metric, the wall
//! time to the target and how many runs diverged.

use std::path::Path;

use clap::Parser;
use serde::Serialize;

use hylo_train::app::{run_training, Cli, Command, TrainCommand};
use hylo_train::output::MetricsRow;

/// One task: a `hylo-train` command line without optimizer, learning rate, damping, seed and
/// output, and the validation metric (accuracy or Dice) that counts as reached.
#[derive(Clone, Debug, Serialize)]
pub struct Task {
    /// Short name.
    pub name: &'static str,
    /// `classify` or `segment`.
    pub command: &'static str,
    /// The rest of the command line.
    pub args: String,
    /// Validation metric to reach.
    pub target: f64,
}

/// The benchmark's tasks: an MLP and a small CNN on a 16-class synthetic set with heavy noise
/// and distractors, a ResNet-20 (BatchNorm) on a 10-class RGB version of it, and a U-Net
/// segmenting random shapes; small training sets, so that an epoch is short and SGD needs
/// several. `quick` halves the epochs.
pub fn tasks(quick: bool) -> Vec<Task> {
    let epochs = |full: u64| if quick { full / 2 } else { full };
    vec![
        Task {
            name: "mlp",
            command: "classify",
            args: format!(
                "--model mlp --dataset synthetic --classes 16 --noise 1.0 --image-size 12 \
                 --train-samples 512 --val-samples 512 --batch-size 32 --epochs {}",
                epochs(12)
            ),
            target: 0.55,
        },
        Task {
            name: "small-cnn",
            command: "classify",
            args: format!(
                "--model small-cnn --dataset synthetic --classes 16 --noise 1.0 --image-size 16 \
                 --train-samples 512 --val-samples 512 --batch-size 32 --epochs {}",
                epochs(10)
            ),
            target: 0.75,
        },
        Task {
            name: "resnet20",
            command: "classify",
            args: format!(
                "--model resnet20 --dataset synthetic --classes 10 --noise 1.0 --channels 3 \
                 --image-size 16 --train-samples 512 --val-samples 256 --batch-size 32 \
                 --epochs {}",
                epochs(8)
            ),
            target: 0.9,
        },
        Task {
            name: "unet",
            command: "segment",
            args: format!(
                "--model unet --dataset shapes --init-features 8 --image-size 32 \
                 --train-samples 256 --val-samples 64 --batch-size 16 --epochs {}",
                epochs(8)
            ),
            target: 0.6,
        },
    ]
}

/// The optimizers compared.
pub const OPTIMIZERS: [&str; 4] = ["sgd", "kfac", "sngd", "hylo"];

/// A setting of one run: the defaults, or a grid point.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Setting {
    /// `--lr`, or the default.
    pub lr: Option<f64>,
    /// `--damping`, or the default (natural-gradient optimizers).
    pub damping: Option<f64>,
}

impl Setting {
    /// The optimizer's `hylo-train` defaults.
    pub const DEFAULTS: Self = Self {
        lr: None,
        damping: None,
    };

    fn flags(&self) -> String {
        let mut out = String::new();
        if let Some(lr) = self.lr {
            out.push_str(&format!(" --lr {lr}"));
        }
        if let Some(d) = self.damping {
            out.push_str(&format!(" --damping {d}"));
        }
        out
    }

    /// A short label (`defaults`, `lr 0.1`, `lr 0.1 damping 1`).
    pub fn label(&self) -> String {
        match (self.lr, self.damping) {
            (None, None) => "defaults".into(),
            _ => self.flags().trim().replace("--", ""),
        }
    }
}

/// The grid of an optimizer: learning rates times dampings (learning rates alone for SGD), for
/// segmentation at a tenth of the learning rates.
pub fn grid(optimizer: &str, segmentation: bool) -> Vec<Setting> {
    let scale = if segmentation { 0.1 } else { 1.0 };
    let lrs = [0.03 * scale, 0.3 * scale];
    let dampings: &[Option<f64>] = if optimizer == "sgd" {
        &[None]
    } else {
        &[Some(0.1), Some(1.0)]
    };
    lrs.iter()
        .flat_map(|&lr| {
            dampings.iter().map(move |&damping| Setting {
                lr: Some(lr),
                damping,
            })
        })
        .collect()
}

/// The outcome of one run.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// Task name.
    pub task: &'static str,
    /// Optimizer.
    pub optimizer: String,
    /// Its setting.
    pub setting: Setting,
    /// Seed.
    pub seed: u64,
    /// Best validation metric over the epochs (0 when the run failed).
    pub best: f64,
    /// Wall seconds until the validation metric first reached the target.
    pub time_to_target: Option<f64>,
    /// The run failed (NaN steps), or its training loss became non-finite or rose above three
    /// times its first epoch's.
    pub diverged: bool,
    /// Wall seconds of the run.
    pub wall_s: f64,
}

/// Whether a run's rows show divergence.
pub fn diverged(rows: &[MetricsRow]) -> bool {
    let Some(first) = rows.first() else {
        return true;
    };
    rows.iter()
        .any(|r| !r.train_loss.is_finite() || r.train_loss > 3.0 * first.train_loss)
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
        "hylo-train {} {} --optim {optimizer}{} --seed {seed} --device {device} --out {}",
        task.command,
        task.args,
        setting.flags(),
        out.display()
    );
    let cli = Cli::try_parse_from(line.split_whitespace()).map_err(|e| format!("{line}: {e}"))?;
    let cmd: TrainCommand = match cli.command {
        Some(Command::Classify(c)) | Some(Command::Segment(c)) => c,
        _ => return Err(format!("{line}: not a training command")),
    };
    let started = std::time::Instant::now();
    let outcome = run_training(task.command, cmd);
    let wall_s = started.elapsed().as_secs_f64();
    let mut result = RunResult {
        task: task.name,
        optimizer: optimizer.into(),
        setting: setting.clone(),
        seed,
        best: 0.0,
        time_to_target: None,
        diverged: true,
        wall_s,
    };
    if let Ok(outcome) = outcome {
        let rows = &outcome.rows;
        result.best = rows
            .iter()
            .map(|r| r.val_score)
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        result.time_to_target = rows
            .iter()
            .find(|r| r.val_score >= task.target)
            .map(|r| r.wall_s);
        result.diverged = diverged(rows);
    }
    Ok(result)
}

/// Per task and optimizer: the defaults and the grid, over the seeds.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Task name.
    pub task: &'static str,
    /// Optimizer.
    pub optimizer: String,
    /// Defaults: the lowest best metric over the seeds (every seed reached at least this).
    pub defaults_best: f64,
    /// Defaults: the slowest time to the target over the seeds (none if a seed missed it).
    pub defaults_time: Option<f64>,
    /// Defaults: runs that diverged.
    pub defaults_diverged: usize,
    /// The grid point whose slowest seed reached the target first (else the best metric).
    pub best_setting: Setting,
    /// Its lowest best metric over the seeds.
    pub grid_best: f64,
    /// Its slowest time to the target over the seeds.
    pub grid_time: Option<f64>,
    /// Grid runs that diverged, and grid runs in all.
    pub grid_diverged: (usize, usize),
}

/// The lowest best metric, the slowest time to target and the diverged count of one setting.
type SeedScore = (f64, Option<f64>, usize);

/// Over the seeds of one setting: the lowest best metric, the slowest time to target (none if
/// any seed missed it) and the diverged count.
fn over_seeds(runs: &[&RunResult]) -> SeedScore {
    let best = runs.iter().map(|r| r.best).fold(f64::INFINITY, f64::min);
    let time = runs
        .iter()
        .map(|r| r.time_to_target)
        .try_fold(0.0f64, |slowest, t| t.map(|t| slowest.max(t)));
    (
        if best.is_finite() { best } else { 0.0 },
        time,
        runs.iter().filter(|r| r.diverged).count(),
    )
}

/// Summaries of `results` per task and optimizer, in the order they first appear.
pub fn summarize(results: &[RunResult]) -> Vec<Summary> {
    let mut keys: Vec<(&'static str, String)> = Vec::new();
    for r in results {
        if !keys.iter().any(|(t, o)| *t == r.task && *o == r.optimizer) {
            keys.push((r.task, r.optimizer.clone()));
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
            let (defaults_best, defaults_time, defaults_diverged) =
                over_seeds(&of(&Setting::DEFAULTS));
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
            let best = scored.iter().min_by(|a, b| match (a.1 .1, b.1 .1) {
                (Some(x), Some(y)) => x.total_cmp(&y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => b.1 .0.total_cmp(&a.1 .0),
            });
            let grid_runs = mine
                .iter()
                .filter(|r| r.setting != Setting::DEFAULTS)
                .count();
            let grid_diverged = mine
                .iter()
                .filter(|r| r.setting != Setting::DEFAULTS && r.diverged)
                .count();
            Summary {
                task,
                optimizer,
                defaults_best,
                defaults_time,
                defaults_diverged,
                best_setting: best.map_or(Setting::DEFAULTS, |b| b.0.clone()),
                grid_best: best.map_or(0.0, |b| b.1 .0),
                grid_time: best.and_then(|b| b.1 .1),
                grid_diverged: (grid_diverged, grid_runs),
            }
        })
        .collect()
}

/// The summaries as a markdown table.
pub fn markdown(summaries: &[Summary], tasks: &[Task], seeds: usize) -> String {
    let secs = |t: Option<f64>| t.map_or("not reached".to_string(), |t| format!("{t:.1} s"));
    let mut out = format!(
        "Metric: validation accuracy (Dice for segmentation), the lowest over {seeds} seeds; \
         time: the slowest seed's wall time to the target.\n\n\
         | task (target) | optimizer | defaults: metric | defaults: time to target | \
         defaults: diverged | best grid point | its metric | its time to target | \
         grid runs diverged |\n|---|---|---|---|---|---|---|---|---|\n"
    );
    for s in summaries {
        let target = tasks
            .iter()
            .find(|t| t.name == s.task)
            .map_or(f64::NAN, |t| t.target);
        out.push_str(&format!(
            "| {} ({:.0}%) | {} | {:.1}% | {} | {} | {} | {:.1}% | {} | {}/{} |\n",
            s.task,
            100.0 * target,
            s.optimizer,
            100.0 * s.defaults_best,
            secs(s.defaults_time),
            s.defaults_diverged,
            s.best_setting.label(),
            100.0 * s.grid_best,
            secs(s.grid_time),
            s.grid_diverged.0,
            s.grid_diverged.1
        ));
    }
    out
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
            task: "t",
            optimizer: optimizer.into(),
            setting,
            seed,
            best,
            time_to_target: t,
            diverged: best < 0.2,
            wall_s: 1.0,
        }
    }

    #[test]
    fn summaries_take_the_worst_seed_and_the_fastest_grid_point() {
        let slow = Setting {
            lr: Some(0.03),
            damping: Some(1.0),
        };
        let fast = Setting {
            lr: Some(0.3),
            damping: Some(1.0),
        };
        let broken = Setting {
            lr: Some(0.3),
            damping: Some(0.1),
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
            (s.defaults_best, s.defaults_time, s.defaults_diverged),
            (0.85, Some(6.0), 0)
        );
        // `fast`: its slowest seed (3 s) beats `slow` (9 s); `broken` missed on one seed.
        assert_eq!(s.best_setting, fast);
        assert_eq!((s.grid_best, s.grid_time), (0.91, Some(3.0)));
        assert_eq!(s.grid_diverged, (1, 6));
        let table = markdown(&summarize(&results), &[], 2);
        assert!(
            table.contains("| hylo | 85.0% | 6.0 s | 0 | lr 0.3 damping 1 | 91.0% | 3.0 s | 1/6 |"),
            "{table}"
        );
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
        };
        assert!(!diverged(&[row(2.0), row(1.0), row(5.9)]));
        assert!(diverged(&[row(2.0), row(6.1)]));
        assert!(diverged(&[row(2.0), row(f64::NAN)]));
        assert!(diverged(&[]));
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
    }
}
