//! Kernels launched per training step on a GPU backend, counted from CubeCL's own log of every
//! kernel it launches (its profiling logger at the `minimal` level, set by a `cubecl.toml` in
//! the probe's working folder). On a GPU a small model's step is bound by kernel launches, so
//! the count stands in for the launch cost; it does not depend on timing and is the same on
//! lavapipe as on a GPU with the same compiler.
//!
//! A probe is a process that runs `steps` steps of one `hylo-train` command and exits; the
//! kernels of step `k` (0-based) are the log lines of a run of `k + 1` steps minus those of a
//! run of `k` (what starts and ends a run, validation included, cancels out). Each probe
//! compiles its kernels again, which is most of its time on lavapipe: three probes per model
//! and optimizer, the middle one shared by the plain and the refresh step.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The models probed: a `hylo-train` command line (without optimizer, steps and output) each.
pub fn models(quick: bool) -> Vec<(&'static str, String)> {
    let mut out = vec![
        (
            "small-cnn",
            "classify --model small-cnn --dataset synthetic --image-size 16 --train-samples 64 \
             --val-samples 4 --batch-size 4"
                .to_string(),
        ),
        (
            "resnet20",
            "classify --model resnet20 --dataset synthetic --channels 3 --image-size 16 \
             --train-samples 64 --val-samples 4 --batch-size 4"
                .to_string(),
        ),
    ];
    if !quick {
        out.extend([
            (
                "resnet32",
                "classify --model resnet32 --dataset synthetic --channels 3 --image-size 32 \
                 --classes 10 --train-samples 64 --val-samples 4 --batch-size 4"
                    .to_string(),
            ),
            (
                "unet",
                "segment --model unet --dataset shapes --init-features 8 --image-size 32 \
                 --train-samples 64 --val-samples 4 --batch-size 4"
                    .to_string(),
            ),
        ]);
    }
    out
}

/// The file, in its working folder, where a probe writes each step's host<->device traffic
/// (JSON, a list of `hylo_optim::host::Traffic`).
pub const TRAFFIC_FILE: &str = "traffic.json";

/// The optimizers probed.
pub const OPTIMIZERS: [&str; 4] = ["sgd", "sngd", "hylo", "kfac"];

/// Refresh period of the probes: step 0 and step `FREQ` refresh, steps 1 to `FREQ - 1` do not.
/// Three probes per model and optimizer, of `FREQ - 1`, `FREQ` and `FREQ + 1` steps, give the
/// plain step `FREQ - 1` (the second after a refresh, so that nothing of the refresh's first
/// use is counted) and the refresh step `FREQ`.
pub const FREQ: u64 = 3;

/// The `hylo-train` arguments of a probe of `steps` steps.
pub fn probe_args(
    model_args: &str,
    optimizer: &str,
    steps: u64,
    device: &str,
    out: &Path,
) -> String {
    // A small learning rate: a period rejected as a blow-up would skip its refresh step's
    // work and count fewer kernels than a refresh.
    format!(
        "{model_args} --optim {optimizer} --lr 0.01 --freq {FREQ} --epochs 1000 \
         --max-steps {steps} --device {device} --out {}",
        out.display()
    )
}

/// The `cubecl.toml` that makes CubeCL log every kernel it launches into `log`.
pub fn cubecl_toml(log: &Path) -> String {
    format!(
        "[profiling.logger]\nlevel = \"minimal\"\nfile = \"{}\"\nappend = false\n",
        log.display()
    )
}

/// Kernel launches in a CubeCL profiling log.
pub fn count_launches(log: &str) -> u64 {
    log.lines().filter(|l| l.contains("Executing")).count() as u64
}

/// Kernels of one model and optimizer: a step between refreshes and a refreshing step (the
/// period's end included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepKernels {
    /// A step that reuses the curvature.
    pub plain: u64,
    /// A step that refreshes it.
    pub refresh: u64,
    /// Bytes a step that reuses the curvature moves between host and device (through
    /// `hylo_optim::host`: the optimizer's reads and uploads).
    #[serde(default)]
    pub plain_bytes: u64,
    /// Bytes a refreshing step moves.
    #[serde(default)]
    pub refresh_bytes: u64,
}

/// Counts per model and optimizer.
pub type KernelTable = BTreeMap<String, BTreeMap<String, StepKernels>>;

/// The counts of `measured` above `budget` (a missing entry is over budget), as messages.
pub fn over_budget(measured: &KernelTable, budget: &KernelTable) -> Vec<String> {
    let mut out = Vec::new();
    for (model, optimizers) in measured {
        for (optimizer, k) in optimizers {
            let allowed = budget.get(model).and_then(|b| b.get(optimizer));
            match allowed {
                None => out.push(format!("{model} {optimizer}: no budget")),
                Some(b) if k.plain > b.plain || k.refresh > b.refresh => out.push(format!(
                    "{model} {optimizer}: {} kernels a plain step, {} a refresh step, over the \
                     budget of {} and {}",
                    k.plain, k.refresh, b.plain, b.refresh
                )),
                Some(b) if k.plain_bytes > b.plain_bytes || k.refresh_bytes > b.refresh_bytes => {
                    out.push(format!(
                        "{model} {optimizer}: {} bytes moved by a plain step, {} by a refresh \
                         step, over the budget of {} and {}",
                        k.plain_bytes, k.refresh_bytes, b.plain_bytes, b.refresh_bytes
                    ))
                }
                Some(_) => {}
            }
        }
    }
    out
}

/// The counts as a markdown table, with each optimizer's ratio to SGD's plain step.
pub fn markdown(table: &KernelTable) -> String {
    let mut out = String::from(
        "| model | optimizer | kernels, plain step | vs SGD | kernels, refresh step | vs SGD | \
         bytes moved, plain step | bytes moved, refresh step |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (model, optimizers) in table {
        let sgd = optimizers.get("sgd").map_or(0, |k| k.plain).max(1) as f64;
        for optimizer in OPTIMIZERS {
            if let Some(k) = optimizers.get(optimizer) {
                out.push_str(&format!(
                    "| {model} | {optimizer} | {} | {:.2}x | {} | {:.2}x | {} | {} |\n",
                    k.plain,
                    k.plain as f64 / sgd,
                    k.refresh,
                    k.refresh as f64 / sgd,
                    k.plain_bytes,
                    k.refresh_bytes
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launches_are_counted_and_budgets_checked() {
        let log = "Executing matmul\nsomething else\nExecuting fused_add\n";
        assert_eq!(count_launches(log), 2);
        let mut measured = KernelTable::new();
        measured.entry("m".into()).or_default().insert(
            "hylo".into(),
            StepKernels {
                plain: 120,
                refresh: 300,
                plain_bytes: 0,
                refresh_bytes: 4096,
            },
        );
        measured.entry("m".into()).or_default().insert(
            "sgd".into(),
            StepKernels {
                plain: 100,
                refresh: 100,
                ..StepKernels::default()
            },
        );
        let mut budget = measured.clone();
        assert!(over_budget(&measured, &budget).is_empty());
        budget.get_mut("m").unwrap().get_mut("hylo").unwrap().plain = 119;
        let over = over_budget(&measured, &budget);
        assert_eq!(over.len(), 1);
        assert!(over[0].contains("m hylo: 120"), "{over:?}");
        // Bytes have a budget too.
        budget.get_mut("m").unwrap().get_mut("hylo").unwrap().plain = 120;
        budget
            .get_mut("m")
            .unwrap()
            .get_mut("hylo")
            .unwrap()
            .refresh_bytes = 4000;
        let over = over_budget(&measured, &budget);
        assert_eq!(over.len(), 1);
        assert!(over[0].contains("4096 by a refresh step"), "{over:?}");
        budget.get_mut("m").unwrap().remove("sgd");
        assert_eq!(over_budget(&measured, &budget).len(), 2);
        let table = markdown(&measured);
        assert!(
            table.contains("| m | hylo | 120 | 1.20x | 300 | 3.00x | 0 | 4096 |"),
            "{table}"
        );
    }
}
