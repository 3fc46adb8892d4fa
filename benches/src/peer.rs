//! Whole training steps beside PyTorch's: our ResNet-32 and U-Net steps with SGD, K-FAC and HyLo,
//! and the same models' SGD step in PyTorch (`benches/peer/torch_step.py`) timed right after
//! them on the same CPU; kept as `peer.json` and rendered into BENCHMARKS.md.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::steps::{sgd_amortised, times_sgd, StepTiming};

/// PyTorch's SGD step of one model, as `torch_step.py --json` prints it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TorchStep {
    /// PyTorch's version.
    pub torch: String,
    /// Threads PyTorch used.
    pub threads: usize,
    /// Median milliseconds of a step.
    pub median_ms: f64,
    /// Fastest step, milliseconds.
    pub min_ms: f64,
}

/// One model's step times: ours per optimizer, and PyTorch's SGD step when it was measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerModel {
    /// The model, batch, input and refresh period, in words.
    pub title: String,
    /// Arguments of `torch_step.py` that time the same model and batch.
    pub torch_args: Vec<String>,
    /// Our steps, per optimizer.
    pub ours: Vec<StepTiming>,
    /// PyTorch's SGD step (absent when no Python with torch was given).
    pub torch: Option<TorchStep>,
}

/// The path of the PyTorch script in the repository.
pub fn torch_script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peer/torch_step.py")
}

/// Runs `python torch_step.py --json args` and reads its last line.
pub fn torch_step(python: &Path, args: &[String]) -> Result<TorchStep, String> {
    let script = torch_script();
    let output = Command::new(python)
        .arg(&script)
        .args(args)
        .arg("--json")
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} {} {}: {}",
            python.display(),
            script.display(),
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    parse_torch_line(&String::from_utf8_lossy(&output.stdout))
}

/// The last line of `torch_step.py --json`'s output as a [`TorchStep`].
pub fn parse_torch_line(stdout: &str) -> Result<TorchStep, String> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or("torch_step.py printed nothing")?;
    serde_json::from_str(line).map_err(|e| format!("torch_step.py printed {line:?}: {e}"))
}

/// Times ResNet-32 (batch 128, refresh every 13) and the U-Net (32 features, batch 4 at
/// 128x128, refresh every 10) with SGD, K-FAC and HyLo on the CPU, each followed by PyTorch's
/// SGD step of the same model through `python` when given. `progress` advances once a step.
pub fn measure(
    python: Option<&Path>,
    progress: &indicatif::ProgressBar,
) -> Result<Vec<PeerModel>, String> {
    use crate::steps::{resnet32_steps, unet_steps};
    type B = burn::backend::Autodiff<burn::backend::Flex>;
    let device = Default::default();
    let torch = |args: &[&str]| -> Result<Option<TorchStep>, String> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        python.map(|p| torch_step(p, &args)).transpose()
    };
    let resnet_args = ["--model", "resnet32", "--batch", "128"];
    let resnet = resnet32_steps::<B>(128, 13, &device, progress);
    let resnet = PeerModel {
        title: "ResNet-32, batch 128, refresh every 13".into(),
        torch_args: resnet_args.iter().map(|a| a.to_string()).collect(),
        ours: resnet,
        torch: torch(&resnet_args)?,
    };
    let unet_args = ["--model", "unet", "--batch", "4", "--size", "128"];
    let unet = unet_steps::<B>(4, 128, 32, &["sgd", "kfac", "hylo"], 10, &device, progress);
    let unet = PeerModel {
        title: "U-Net (32 features), batch 4, 128x128, refresh every 10".into(),
        torch_args: unet_args.iter().map(|a| a.to_string()).collect(),
        ours: unet,
        torch: torch(&unet_args)?,
    };
    Ok(vec![resnet, unet])
}

/// Steps [`measure`] takes (for a progress bar).
pub const MEASURED_STEPS: u64 = 5 + 3 * 14 + 5 + 2 * 11;

/// The markdown table of `models`: per model and optimizer our plain, refresh and amortised
/// steps, and the ratio of our SGD step to PyTorch's.
pub fn markdown(models: &[PeerModel]) -> String {
    let mut md = String::from(
        "| model | optimizer | plain step (s) | refresh step (s) | amortised (s) | amortised / our SGD |\n\
         |---|---|---|---|---|---|\n",
    );
    for m in models {
        let sgd = sgd_amortised(&m.ours);
        for t in m.ours.iter().filter(|t| t.optimizer != "sngd") {
            md.push_str(&format!(
                "| {} | {} | {:.3} | {:.3} | {:.3} | {} |\n",
                m.title,
                t.optimizer,
                t.plain_step,
                t.refresh_step,
                t.amortised,
                times_sgd(t.amortised, sgd)
            ));
        }
        match &m.torch {
            Some(p) => md.push_str(&format!(
                "| {} | PyTorch {} SGD ({} threads; median, min) | {:.3} | {:.3} (min) | {:.3} | {} |\n",
                m.title,
                p.torch,
                p.threads,
                p.median_ms / 1e3,
                p.min_ms / 1e3,
                p.median_ms / 1e3,
                times_sgd(p.median_ms / 1e3, sgd)
            )),
            None => md.push_str(&format!(
                "| {} | PyTorch: not measured (no `--torch-python`) | | | | |\n",
                m.title
            )),
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_torch_line_is_read_and_a_bad_one_is_named() {
        let line =
            "{\"torch\": \"2.5.1\", \"threads\": 2, \"median_ms\": 344.0, \"min_ms\": 332.5}\n";
        let step = parse_torch_line(&format!("warning: something\n{line}\n")).unwrap();
        assert_eq!(step.median_ms, 344.0);
        assert_eq!(step.threads, 2);
        let err = parse_torch_line("torch 2.5 resnet32 step_ms median=3").unwrap_err();
        assert!(err.contains("step_ms median=3"), "{err}");
        assert!(parse_torch_line("").is_err());
    }

    #[test]
    fn the_table_puts_pytorch_beside_our_sgd() {
        let t = |name: &str, s: f64| StepTiming {
            optimizer: name.into(),
            refresh_step: s,
            plain_step: s,
            amortised: s,
            reads_refresh_step: 0,
            reads_plain_step: 0,
        };
        let model = PeerModel {
            title: "ResNet-32".into(),
            torch_args: vec![],
            ours: vec![t("sgd", 0.5), t("hylo", 0.6)],
            torch: Some(TorchStep {
                torch: "2.5.1".into(),
                threads: 2,
                median_ms: 250.0,
                min_ms: 240.0,
            }),
        };
        let md = markdown(std::slice::from_ref(&model));
        assert!(
            md.contains("| ResNet-32 | hylo | 0.600 | 0.600 | 0.600 | 1.20x |"),
            "{md}"
        );
        assert!(
            md.contains("| 0.250 | 0.240 (min) | 0.250 | 0.50x |"),
            "{md}"
        );
        let md = markdown(&[PeerModel {
            torch: None,
            ..model
        }]);
        assert!(md.contains("not measured"), "{md}");
    }
}
