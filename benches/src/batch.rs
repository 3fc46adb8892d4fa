//! The batch-size study: the BatchNorm ResNet-20 on the repository's MNIST digits at batches 32
//! to 512, the same number of epochs, each optimizer's learning rate scaled with the batch as
//! its paper scales it (linearly from its default at batch 64 for SGD, the natural-gradient
//! methods and the Neumann optimizer; Adam by the square root) with one epoch of warm-up: final
//! accuracy and time to the target per optimizer and batch.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::convergence::{default_lr, mnist_dir, RunResult, Setting, Task};
use hylo_train::plot::{draw, Panel, Series};

/// The batches of the study.
pub const BATCHES: [u64; 5] = [32, 64, 128, 256, 512];

/// The batch at which each optimizer's learning rate is its default.
pub const BASE_BATCH: u64 = 64;

/// Epochs of every run.
pub const EPOCHS: u64 = 3;

/// The study's task at `batch`: ResNet-20 with BatchNorm on the MNIST digits at 32x32, one
/// epoch of warm-up.
pub fn task(batch: u64) -> Task {
    Task {
        name: format!("resnet20-b{batch}"),
        command: "classify".into(),
        args: format!(
            "--model resnet20 --dataset mnist --data-dir {} --image-size 32 --batch-size {batch} \
             --epochs {EPOCHS} --warmup-epochs 1",
            mnist_dir().display()
        ),
        target: 0.9,
        real: true,
        // About four checks an epoch (4,000 samples).
        check_every: (4000 / batch / 4).max(1),
    }
}

/// `optimizer`'s learning rate at `batch`: its default times `batch / 64` (Adam: the square
/// root of that).
pub fn scaled_lr(optimizer: &str, batch: u64) -> f64 {
    let ratio = batch as f64 / BASE_BATCH as f64;
    let factor = if optimizer == "adam" {
        ratio.sqrt()
    } else {
        ratio
    };
    default_lr(optimizer) * factor
}

/// The setting of `optimizer` at `batch`.
pub fn setting(optimizer: &str, batch: u64) -> Setting {
    Setting::lr(scaled_lr(optimizer, batch))
}

/// One point of the study: an optimizer at a batch, its worst seed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Point {
    /// Optimizer.
    pub optimizer: String,
    /// Batch size.
    pub batch: u64,
    /// The learning rate used.
    pub lr: f64,
    /// The final validation accuracy (mean of the last epoch's checks; lowest seed).
    pub last: f64,
    /// Training seconds to the target (slowest seed), if every seed reached it.
    pub time: Option<f64>,
    /// Runs that diverged.
    pub diverged: usize,
}

/// The points of `runs` (tasks named by [`task`]), in the order they first appear.
pub fn points(runs: &[RunResult]) -> Vec<Point> {
    let mut out: Vec<Point> = Vec::new();
    for r in runs {
        let Some(batch) = r
            .task
            .strip_prefix("resnet20-b")
            .and_then(|b| b.parse().ok())
        else {
            continue;
        };
        let at = out
            .iter()
            .position(|p| p.optimizer == r.optimizer && p.batch == batch);
        match at {
            Some(i) => {
                let p = &mut out[i];
                p.last = p.last.min(r.last_epoch_mean);
                p.time = p.time.zip(r.time_to_target).map(|(a, b)| a.max(b));
                p.diverged += usize::from(r.diverged);
            }
            None => out.push(Point {
                optimizer: r.optimizer.clone(),
                batch,
                lr: r.setting.lr.unwrap_or(f64::NAN),
                last: r.last_epoch_mean,
                time: r.time_to_target,
                diverged: usize::from(r.diverged),
            }),
        }
    }
    out
}

/// The points as a markdown table: a row per optimizer, a column per batch.
pub fn markdown(points: &[Point], seeds: usize) -> String {
    let mut optimizers: Vec<&str> = Vec::new();
    for p in points {
        if !optimizers.contains(&p.optimizer.as_str()) {
            optimizers.push(&p.optimizer);
        }
    }
    let mut out = format!(
        "Each cell: the final validation accuracy (mean of the last epoch's checks) and the \
         training time to 90% (`-`: not reached), the worst of {seeds} seed(s); `(dN)`: N runs \
         diverged.\n\n| optimizer |{}\n|---|{}\n",
        BATCHES
            .iter()
            .map(|b| format!(" batch {b} |"))
            .collect::<String>(),
        "---|".repeat(BATCHES.len())
    );
    for o in optimizers {
        out.push_str(&format!("| {o} |"));
        for b in BATCHES {
            match points.iter().find(|p| p.optimizer == o && p.batch == b) {
                Some(p) => {
                    let time = p.time.map_or("-".to_string(), |t| format!("{t:.0} s"));
                    let diverged = if p.diverged > 0 {
                        format!(" (d{})", p.diverged)
                    } else {
                        String::new()
                    };
                    out.push_str(&format!(" {:.1}%, {time}{diverged} |", 100.0 * p.last));
                }
                None => out.push_str(" |"),
            }
        }
        out.push('\n');
    }
    out
}

/// `batch.png`: final accuracy and time to the target against log2 of the batch, a line per
/// optimizer.
pub fn plot(points: &[Point], path: &Path) -> Result<(), String> {
    let mut optimizers: Vec<&str> = Vec::new();
    for p in points {
        if !optimizers.contains(&p.optimizer.as_str()) {
            optimizers.push(&p.optimizer);
        }
    }
    let series = |y: &dyn Fn(&Point) -> Option<f64>| -> Vec<Series> {
        optimizers
            .iter()
            .map(|o| Series {
                label: o.to_string(),
                points: points
                    .iter()
                    .filter(|p| p.optimizer == *o)
                    .filter_map(|p| y(p).map(|v| ((p.batch as f64).log2(), v)))
                    .collect(),
            })
            .collect()
    };
    draw(
        path,
        &[
            Panel {
                title: "final validation accuracy (%)".into(),
                x_label: "log2(batch)".into(),
                series: series(&|p| Some(100.0 * p.last)),
                reference: Some((90.0, "target".into())),
            },
            Panel {
                title: "training seconds to 90%".into(),
                x_label: "log2(batch)".into(),
                series: series(&|p| p.time),
                reference: None,
            },
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learning_rates_scale_as_each_paper_scales_them() {
        assert!((scaled_lr("sgd", 64) - 0.1).abs() < 1e-12);
        assert!((scaled_lr("hylo", 512) - 0.8).abs() < 1e-12);
        assert!((scaled_lr("neumann", 32) - 0.05).abs() < 1e-12);
        assert!((scaled_lr("adam", 256) - 2e-3).abs() < 1e-12);
        assert!(task(128)
            .args
            .contains("--batch-size 128 --epochs 3 --warmup-epochs 1"));
        assert_eq!(task(512).check_every, 1);
    }
}
