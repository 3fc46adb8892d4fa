//! The sensitivity sweep: every optimizer over five learning rates around its default and two
//! momenta, on three tasks (an MLP on real digits, the BatchNorm ResNet-20, the U-Net), over
//! seeds; per task, optimizer and momentum the final metric at each learning rate (worst seed),
//! the runs that diverged and the spread between the best and the worst learning rate: the
//! picture that shows whether an optimizer needs tuning.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::convergence::{default_lr, RunResult, Setting, Task};
use hylo_train::plot::{draw, Panel, Series};

/// The sweep's tasks, by name in [`crate::convergence::tasks`].
pub const SWEEP_TASKS: [&str; 3] = ["mnist-mlp", "resnet20", "unet"];

/// Learning rates relative to each optimizer's default (0.01 to 1.0 for a default of 0.1).
pub const LR_FACTORS: [f64; 5] = [0.1, 0.3, 1.0, 3.0, 10.0];

/// Momenta of the sweep.
pub const MOMENTA: [f64; 2] = [0.0, 0.9];

/// Whether `--momentum` means anything to `optimizer` (Adam has its own betas, the Neumann
/// optimizer its own momentum schedule: they run once per learning rate).
pub fn takes_momentum(optimizer: &str) -> bool {
    !matches!(optimizer, "adam" | "neumann")
}

/// The settings of `optimizer` in the sweep.
pub fn settings(optimizer: &str) -> Vec<Setting> {
    let lrs = LR_FACTORS.map(|f| round(f * default_lr(optimizer)));
    if !takes_momentum(optimizer) {
        return lrs.into_iter().map(Setting::lr).collect();
    }
    MOMENTA
        .into_iter()
        .flat_map(|m| {
            lrs.into_iter().map(move |lr| Setting {
                momentum: Some(m),
                ..Setting::lr(lr)
            })
        })
        .collect()
}

/// `x` to three significant digits (0.3 x 0.1 is 0.030000000000000002).
fn round(x: f64) -> f64 {
    let scale = 10f64.powi(2 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

/// One curve of the sweep: a task, an optimizer and a momentum over the learning rates.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Curve {
    /// Task name.
    pub task: String,
    /// Optimizer.
    pub optimizer: String,
    /// `--momentum`, or `None` for optimizers with their own.
    pub momentum: Option<f64>,
    /// `(learning rate, lowest final metric over the seeds (the mean of the last epoch's
    /// checks), runs that diverged)`.
    pub points: Vec<(f64, f64, usize)>,
}

impl Curve {
    /// The best minus the worst final metric over the learning rates.
    pub fn spread(&self) -> f64 {
        let finals = self.points.iter().map(|p| p.1);
        let best = finals.clone().fold(f64::MIN, f64::max);
        let worst = finals.fold(f64::MAX, f64::min);
        best - worst
    }

    /// The label of the curve (`sgd`, `hylo m=0`).
    pub fn label(&self) -> String {
        match self.momentum {
            Some(m) => format!("{} m={m}", self.optimizer),
            None => self.optimizer.clone(),
        }
    }
}

/// The curves of `runs`, in the order they first appear.
pub fn curves(runs: &[RunResult]) -> Vec<Curve> {
    let mut out: Vec<Curve> = Vec::new();
    for r in runs {
        let Some(lr) = r.setting.lr else { continue };
        let key = (r.task.as_str(), r.optimizer.as_str(), r.setting.momentum);
        let at = out.iter().position(|c| {
            (c.task.as_str(), c.optimizer.as_str(), c.momentum) == (key.0, key.1, key.2)
        });
        let curve = match at {
            Some(i) => &mut out[i],
            None => {
                out.push(Curve {
                    task: r.task.clone(),
                    optimizer: r.optimizer.clone(),
                    momentum: r.setting.momentum,
                    points: Vec::new(),
                });
                out.last_mut().expect("just pushed")
            }
        };
        let diverged = usize::from(r.diverged);
        match curve.points.iter_mut().find(|p| p.0 == lr) {
            Some(p) => {
                p.1 = p.1.min(r.last_epoch_mean);
                p.2 += diverged;
            }
            None => curve.points.push((lr, r.last_epoch_mean, diverged)),
        }
    }
    for c in &mut out {
        c.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// The curves as a markdown table: one row per curve, the final metric at each learning-rate
/// factor (and the runs that diverged there), the spread.
pub fn markdown(curves: &[Curve], seeds: usize) -> String {
    let mut out = format!(
        "Final validation metric (accuracy, Dice for the U-Net), the worst of {seeds} seeds, at \
         each learning rate as a factor of the optimizer's default (0.1; Adam's 0.001); `(dN)`: N \
         runs diverged. Spread: best minus worst over the learning rates.\n\n| task | optimizer \
         |{}spread |\n|---|---|{}---|\n",
        LR_FACTORS
            .iter()
            .map(|f| format!(" x{f} |"))
            .collect::<String>(),
        "---|".repeat(LR_FACTORS.len())
    );
    for c in curves {
        out.push_str(&format!("| {} | {} |", c.task, c.label()));
        for p in &c.points {
            let diverged = if p.2 > 0 {
                format!(" (d{})", p.2)
            } else {
                String::new()
            };
            out.push_str(&format!(" {:.1}%{diverged} |", 100.0 * p.1));
        }
        out.push_str(&format!(" {:.1} |\n", 100.0 * c.spread()));
    }
    out
}

/// `sweep.png`: one panel per task and momentum, the final metric against log10 of the learning
/// rate's factor, a line per optimizer (Adam and Neumann, with their own momentum, in both
/// panels of a task).
pub fn plot(curves: &[Curve], tasks: &[Task], path: &Path) -> Result<(), String> {
    let mut panels = Vec::new();
    for task in tasks {
        for m in MOMENTA {
            let series = curves
                .iter()
                .filter(|c| c.task == task.name && c.momentum.is_none_or(|cm| cm == m))
                .map(|c| Series {
                    label: c.optimizer.clone(),
                    points: c
                        .points
                        .iter()
                        .map(|p| {
                            let factor = p.0 / default_lr(&c.optimizer);
                            (factor.log10(), 100.0 * p.1)
                        })
                        .collect(),
                })
                .collect();
            panels.push(Panel {
                title: format!("{} (momentum {m})", task.name),
                x_label: "log10(lr / default lr)".into(),
                series,
                reference: Some((100.0 * task.target, "target".into())),
            });
        }
    }
    draw(path, &panels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_optimizer_sweeps_five_rates_and_the_momenta_it_takes() {
        assert_eq!(settings("sgd").len(), 10);
        assert_eq!(settings("hylo").len(), 10);
        assert_eq!(settings("adam").len(), 5);
        assert_eq!(settings("neumann").len(), 5);
        let lrs: Vec<f64> = settings("sgd")
            .iter()
            .take(5)
            .map(|s| s.lr.unwrap())
            .collect();
        assert_eq!(lrs, vec![0.01, 0.03, 0.1, 0.3, 1.0]);
        assert_eq!(settings("adam")[0].lr, Some(1e-4));
        assert!(settings("kfac").iter().any(|s| s.momentum == Some(0.0)));
    }

    #[test]
    fn curves_take_the_worst_seed_and_count_divergence() {
        let run = |lr: f64, seed: u64, last: f64, diverged: bool| RunResult {
            task: "t".into(),
            optimizer: "sgd".into(),
            setting: Setting {
                momentum: Some(0.9),
                ..Setting::lr(lr)
            },
            seed,
            last,
            last_epoch_mean: last,
            best: last,
            steps_to_target: None,
            time_to_target: None,
            diverged,
            loss_rises: 0,
            train_losses: vec![],
            error: None,
            dampings: vec![],
            metrics: vec![last],
            wall_s: 1.0,
        };
        let c = &curves(&[
            run(0.1, 0, 0.9, false),
            run(0.1, 1, 0.8, false),
            run(0.01, 0, 0.5, false),
            run(1.0, 0, 0.1, true),
        ])[0];
        assert_eq!(c.points, vec![(0.01, 0.5, 0), (0.1, 0.8, 0), (1.0, 0.1, 1)]);
        assert!((c.spread() - 0.7).abs() < 1e-12);
        let table = markdown(std::slice::from_ref(c), 2);
        assert!(
            table.contains("| t | sgd m=0.9 | 50.0% | 80.0% | 10.0% (d1) | 70.0 |"),
            "{table}"
        );
    }
}
