//! The demo: a small CNN on real handwritten digits (the 4,000 + 1,000 MNIST digits kept in the
//! repository and embedded in the binary) with SGD, K-FAC and HyLo, each with its defaults, for
//! the same time budget; a table of the results and a plot of the curves. Needs no download.

use std::path::PathBuf;

use clap::Args;

use crate::cli::{DatasetName, OptimName, TrainArgs};
use crate::training::{run_training, TrainCommand};

/// Settings of the demo.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// cpu, wgpu, cuda or cuda:N (GPU backends need the matching Cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seconds of training per optimizer.
    #[arg(long, default_value_t = 20.0)]
    pub budget: f64,
    /// Validation accuracy whose first crossing is timed.
    #[arg(long, default_value_t = 0.95)]
    pub target: f64,
    /// Output directory (one run per optimizer and demo.png).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Seed of data and weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Default for DemoArgs {
    fn default() -> Self {
        use clap::FromArgMatches;
        let cmd = <Self as Args>::augment_args(clap::Command::new("demo"));
        Self::from_arg_matches(&cmd.get_matches_from(["demo"])).expect("defaults parse")
    }
}

/// One row of the demo's table.
#[derive(Clone, Debug)]
pub struct DemoResult {
    /// Optimizer.
    pub optimizer: OptimName,
    /// Validation accuracy at the end of the budget.
    pub final_accuracy: f64,
    /// Seconds of training until the validation accuracy first reached the target (checked
    /// every 20 steps and at each epoch's end).
    pub time_to_target: Option<f64>,
    /// Milliseconds of training per optimizer step.
    pub ms_per_step: f64,
    /// Steps taken.
    pub steps: u64,
    /// Seconds of the untimed warm-up run before the budget starts (the first curvature refresh
    /// and a plain step: GPU backends compile their kernels on first use).
    pub warmup_s: f64,
}

/// The demo's training arguments for one optimizer.
pub fn demo_train_args(demo: &DemoArgs, optim: OptimName) -> TrainArgs {
    use clap::FromArgMatches;
    let cmd = <TrainArgs as Args>::augment_args(clap::Command::new("demo"));
    let mut args =
        TrainArgs::from_arg_matches(&cmd.get_matches_from(["demo"])).expect("defaults parse");
    // Every optimizer with `hylo-train`'s defaults (learning rate 0.1, momentum 0.9, refresh
    // every 10 steps, adaptive damping, grafting, the step-length trust region).
    args.model = "small-cnn".into();
    args.dataset = DatasetName::Mnist;
    args.data_dir = Some(demo.out.join("data"));
    args.optim = optim;
    args.epochs = 10_000;
    args.time_budget = Some(demo.budget);
    // The target is checked every 20 steps, off the clock.
    args.val_every = Some(20);
    args.device = demo.device.clone();
    args.seed = demo.seed;
    args.out = Some(demo.out.join(format!("{optim:?}").to_lowercase()));
    // The demo's own folders: a second demo replaces the first.
    args.overwrite = true;
    args
}

/// The MNIST digits of `datasets/data/mnist-5k`, in the binary.
const DIGITS: [(&str, &[u8]); 4] = [
    (
        "train-images-idx3-ubyte.gz",
        include_bytes!("../../datasets/data/mnist-5k/train-images-idx3-ubyte.gz"),
    ),
    (
        "train-labels-idx1-ubyte.gz",
        include_bytes!("../../datasets/data/mnist-5k/train-labels-idx1-ubyte.gz"),
    ),
    (
        "t10k-images-idx3-ubyte.gz",
        include_bytes!("../../datasets/data/mnist-5k/t10k-images-idx3-ubyte.gz"),
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        include_bytes!("../../datasets/data/mnist-5k/t10k-labels-idx1-ubyte.gz"),
    ),
];

/// Writes the embedded digits into `dir` (the demo reads them as any MNIST folder).
pub fn write_digits(dir: &std::path::Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (name, bytes) in DIGITS {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Runs the three optimizers and returns the table rows (and writes `demo.png`).
pub fn run(demo: &DemoArgs) -> Result<Vec<DemoResult>, String> {
    write_digits(&demo.out.join("data"))?;
    let mut results = Vec::new();
    let mut dirs = Vec::new();
    for optim in [OptimName::Sgd, OptimName::Kfac, OptimName::Hylo] {
        let args = demo_train_args(demo, optim);
        // Warm-up: a curvature step and a plain step into a scratch directory, untimed. On a GPU
        // backend the first use of each kernel compiles it (seconds per kernel on a software
        // Vulkan driver); the budget then measures training, not compilation.
        let mut warmup = args.clone();
        warmup.max_steps = Some(2);
        warmup.time_budget = None;
        warmup.out = Some(
            demo.out
                .join("warmup")
                .join(format!("{optim:?}").to_lowercase()),
        );
        let started = std::time::Instant::now();
        run_training(
            "classify",
            TrainCommand {
                args: warmup,
                resume: None,
            },
        )?;
        let warmup_s = started.elapsed().as_secs_f64();
        dirs.push(args.out_dir().to_path_buf());
        let outcome = run_training("classify", TrainCommand { args, resume: None })?;
        let mut checks: Vec<(u64, f64, f64)> = outcome
            .rows
            .iter()
            .map(|r| (r.step, r.wall_s, r.val_score))
            .chain(
                outcome
                    .checks
                    .iter()
                    .map(|c| (c.step, c.wall_s, c.val_score)),
            )
            .collect();
        checks.sort_by_key(|c| c.0);
        let time_to_target = checks.iter().find(|c| c.2 >= demo.target).map(|c| c.1);
        results.push(DemoResult {
            optimizer: optim,
            final_accuracy: outcome.final_val.1,
            time_to_target,
            ms_per_step: outcome.state.wall_s * 1e3 / outcome.state.global_step.max(1) as f64,
            steps: outcome.state.global_step,
            warmup_s,
        });
    }
    let labelled: Vec<_> = dirs
        .into_iter()
        .zip(&results)
        .map(|(dir, r)| {
            let name = format!("{:?}", r.optimizer).to_lowercase();
            let label = match r.time_to_target {
                Some(t) => format!("{name}: {:.0}% at {t:.1} s", 100.0 * demo.target),
                None => format!("{name}: {:.0}% not reached", 100.0 * demo.target),
            };
            (dir, label)
        })
        .collect();
    crate::plot::race(&labelled, demo.target, &demo.out.join("demo.png"))?;
    Ok(results)
}

/// The results as a markdown table.
pub fn table(results: &[DemoResult], target: f64) -> String {
    let mut out = format!(
        "| optimizer | final val accuracy | time to {:.0}% val accuracy | ms/step | steps | warm-up (untimed) |\n|---|---|---|---|---|---|\n",
        target * 100.0
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {:.1}% | {} | {:.1} | {} | {:.1} s |\n",
            format!("{:?}", r.optimizer).to_lowercase(),
            100.0 * r.final_accuracy,
            r.time_to_target
                .map_or("not reached".to_string(), |t| format!("{t:.1} s")),
            r.ms_per_step,
            r.steps,
            r.warmup_s
        ));
    }
    out
}

/// The `demo` command: runs, prints the table, names the plot.
pub fn run_cli(demo: &DemoArgs) -> Result<(), String> {
    let device = crate::device::describe(demo.device.parse()?)?;
    println!(
        "demo: a small CNN on 4,000 real MNIST digits (1,000 held out), {:.0} s of training per \
         optimizer (SGD, K-FAC, HyLo, each with its defaults) on {device}",
        demo.budget
    );
    let results = run(demo)?;
    print!("{}", table(&results, demo.target));
    println!("curves: {}", demo.out.join("demo.png").display());
    Ok(())
}
