//! A training command (`classify`, `segment`) from its arguments to its outcome: the workers,
//! the backend, the data, the model and its initial weights, then the trainer.

use std::path::PathBuf;

use burn::backend::Flex;
use burn::tensor::backend::{AutodiffBackend, Backend};
use clap::Args;
use hylo_models::{build_segmenter, Classifier, ClassifierSpec, ModelName};
use hylo_optim::CaptureHandle;

use crate::cli::TrainArgs;
use crate::trainer::{train, Outcome};
use crate::workers::Workers;
use crate::{data, output, with_backend};

/// `classify` / `segment`.
#[derive(Args, Debug)]
pub struct TrainCommand {
    /// Training settings.
    #[command(flatten)]
    pub args: TrainArgs,
    /// Continue the run in DIR from its checkpoint (its config.json is used; --max-steps and
    /// --time-budget given here apply).
    #[arg(long)]
    pub resume: Option<PathBuf>,
}

/// Trains (or resumes) as `classify`/`segment`; the caller reports the outcome (see
/// [`summary`]).
pub fn run_training(command: &str, cmd: TrainCommand) -> Result<Outcome, String> {
    let (args, resume) = match &cmd.resume {
        Some(dir) => {
            let (saved_command, mut args) = output::read_config(dir)?;
            if saved_command != command {
                return Err(format!(
                    "{}: the run was a `{saved_command}` run, not `{command}`",
                    dir.display()
                ));
            }
            args.out = Some(dir.clone());
            args.max_steps = cmd.args.max_steps;
            args.time_budget = cmd.args.time_budget;
            (args, true)
        }
        None => (cmd.args, false),
    };
    let mut args = args;
    args.validate()?;
    let model: ModelName = args.model.parse()?;
    if (command == "segment") != model.is_segmenter() {
        return Err(format!("`{command}` cannot train --model {model}: use classify for classifiers and segment for unet"));
    }
    let workers = start_workers(&args)?;
    if !resume {
        args.out = Some(output_dir(&args, command, &workers.0)?);
    }
    let result = with_backend!(args.device()?, |B, device| train_on::<B>(
        &args, command, model, resume, &device, &workers.0
    ));
    let mut outcome = match result {
        Ok(outcome) => outcome,
        // A failing rank ends the whole job, so that no rank waits forever in a collective.
        Err(e) if workers.0.distributed() => workers.0.comm.abort(&e),
        Err(e) => return Err(e),
    };
    if workers.0.writes() {
        outcome.summary = Some(summary(&outcome, model.is_segmenter(), args.out_dir()));
    }
    Ok(outcome)
}

/// Where a new run writes: `--out` unless it holds a run already (refused without
/// `--overwrite`), or the first free `runs/<command>-<model>-<optim>[-N]`. Distributed runs
/// need `--out` (every rank must name the same folder), and only the writing rank checks it.
pub fn output_dir(
    args: &crate::cli::TrainArgs,
    command: &str,
    workers: &Workers,
) -> Result<PathBuf, String> {
    if args.out.is_none() && workers.distributed() {
        return Err(
            "--distributed needs --out DIR (one folder, on a filesystem every rank sees)".into(),
        );
    }
    if let Some(dir) = &args.out {
        if workers.writes() && holds_run(dir) && !args.overwrite {
            return Err(format!(
                "--out {}: it holds a run already; continue it with --resume {}, pass \
                 --overwrite to replace it, or give another --out",
                dir.display(),
                dir.display()
            ));
        }
        return Ok(dir.clone());
    }
    let optim = format!("{:?}", args.optim).to_lowercase();
    Ok(free_run_dir(
        std::path::Path::new("runs"),
        &format!("{command}-{}-{optim}", args.model),
    ))
}

/// Whether `dir` holds a run (its config, metrics or checkpoint).
fn holds_run(dir: &std::path::Path) -> bool {
    ["config.json", "metrics.csv", "checkpoint"]
        .iter()
        .any(|f| dir.join(f).exists())
}

/// `root/name`, or `root/name-2`, `-3`, ... : the first that holds no run.
pub fn free_run_dir(root: &std::path::Path, name: &str) -> PathBuf {
    let mut dir = root.join(name);
    let mut n = 1;
    while holds_run(&dir) {
        n += 1;
        dir = root.join(format!("{name}-{n}"));
    }
    dir
}

/// One line on how a run ended.
pub fn summary(outcome: &Outcome, segments: bool, out: &std::path::Path) -> String {
    format!(
        "{:?} after {} epochs, {} steps, {:.1}s: val loss {:.4}, val {} {:.4}; outputs in {}",
        outcome.stop,
        outcome.state.epoch,
        outcome.state.global_step,
        outcome.state.wall_s,
        outcome.final_val.0,
        if segments { "dice" } else { "acc" },
        outcome.final_val.1,
        out.display()
    )
}

/// The workers of this run: MPI's world with `--distributed` (the guard keeps MPI initialised
/// until the run ends), else this process alone.
type WorkersGuard = (Workers, Option<Box<dyn std::any::Any>>);

fn start_workers(args: &TrainArgs) -> Result<WorkersGuard, String> {
    if !args.distributed {
        return Ok((Workers::default(), None));
    }
    #[cfg(feature = "mpi")]
    {
        let (universe, comm) = hylo_optim::comm::mpi::MpiComm::init()?;
        let comm: std::sync::Arc<dyn hylo_optim::comm::Communicator> = std::sync::Arc::new(comm);
        // A rank that panics must end the job: left alone, the others would wait forever in
        // their next collective (dropping the MPI universe only finalises this rank).
        let abort = comm.clone();
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            abort.abort(&format!("rank {} panicked: {info}", abort.rank()));
        }));
        Ok((Workers::new(comm), Some(Box::new(universe))))
    }
    #[cfg(not(feature = "mpi"))]
    Err(
        "--distributed needs MPI: rebuild with `cargo build --release -p hylo-train --features mpi` \
         (Open MPI and libclang must be installed) and start with `mpirun -np P hylo-train ...`"
            .into(),
    )
}

fn train_on<B: AutodiffBackend>(
    args: &TrainArgs,
    command: &str,
    model: ModelName,
    resume: bool,
    device: &B::Device,
    workers: &Workers,
) -> Result<Outcome, String> {
    let data = data::load(args)?;
    let capture = CaptureHandle::new();
    // Weights are drawn on the CPU from the seed, so every backend starts from the same model.
    Flex::seed(&Default::default(), args.seed);
    B::seed(device, args.seed);
    let [channels, height, width] = data.shape();
    if model.is_segmenter() {
        if height % 16 != 0 || width % 16 != 0 {
            return Err(format!(
                "unet needs image sides divisible by 16, the data gives {height}x{width}"
            ));
        }
        let features = args.init_features as usize;
        let unet = on_device::<B, _>(
            build_segmenter::<Flex>(model, channels, features, &capture, &Default::default())?,
            build_segmenter::<B>(model, channels, features, &capture, device)?,
            device,
        )?;
        train(
            args, command, &data, unet, &capture, device, resume, workers,
        )
    } else {
        let mut spec = ClassifierSpec::new(channels, height, data.classes());
        spec.conv_bias = args.conv_bias;
        spec.mlp_hidden = args.hidden.clone();
        let classifier = on_device::<B, _>(
            Classifier::<Flex>::build(model, &spec, &capture, &Default::default())?,
            Classifier::<B>::build(model, &spec, &capture, device)?,
            device,
        )?;
        train(
            args, command, &data, classifier, &capture, device, resume, workers,
        )
    }
}

/// `template` (built on `B`'s device) holding the weights of `initial` (drawn on the CPU).
fn on_device<B: AutodiffBackend, M: burn::module::Module<B>>(
    initial: impl burn::module::Module<Flex>,
    template: M,
    device: &B::Device,
) -> Result<M, String> {
    use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::new();
    let bytes = recorder
        .record(initial.into_record(), ())
        .map_err(|e| format!("cannot move the initial weights to the device: {e}"))?;
    let record = recorder
        .load(bytes, device)
        .map_err(|e| format!("cannot move the initial weights to the device: {e}"))?;
    Ok(template.load_record(record))
}
