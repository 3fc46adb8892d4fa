//! The commands of `hylo-train`: classify, segment, info, compare (and the demo in `demo.rs`).

use std::path::PathBuf;

use burn::backend::Flex;
use burn::tensor::backend::{AutodiffBackend, Backend};
use clap::{Args, Parser, Subcommand};
use hylo_models::{
    build_segmenter, preconditioned_layers, trainable_params, Classifier, ClassifierSpec, ModelName,
};
use hylo_optim::CaptureHandle;

use crate::cli::TrainArgs;
use crate::demo::DemoArgs;
use crate::trainer::{train, Outcome};
use crate::workers::Workers;
use crate::{data, output, with_backend};

/// Command line of `hylo-train`.
#[derive(Parser, Debug)]
#[command(
    name = "hylo-train",
    about = "Natural-gradient training with HyLo, SNGD and K-FAC",
    version
)]
pub struct Cli {
    /// The command; none runs the demo.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a small CNN on a hard synthetic set with SGD, K-FAC and HyLo for the same time budget.
    Demo(DemoArgs),
    /// Train a classifier.
    Classify(TrainCommand),
    /// Train a segmentation model (Dice loss, Dice metric).
    Segment(TrainCommand),
    /// Print a model's parameter count and preconditioned layers.
    Info(InfoArgs),
    /// Plot several runs' curves against wall time and epochs.
    Compare(CompareArgs),
}

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

/// `info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Model name.
    #[arg(long)]
    pub model: String,
    /// Classes of the classifier (default: the dataset the model was made for).
    #[arg(long)]
    pub classes: Option<usize>,
    /// Input channels (default: the dataset the model was made for).
    #[arg(long)]
    pub channels: Option<usize>,
    /// Input side (default: the dataset the model was made for; small-cnn, mlp and 3c1f depend
    /// on it).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// CIFAR ResNets: biased convolutions.
    #[arg(long)]
    pub conv_bias: bool,
    /// U-Net: channels at the first level.
    #[arg(long, default_value_t = 32)]
    pub init_features: usize,
}

/// The data a model was made for: `(setting, channels, side, classes)`.
pub fn native_shape(model: ModelName) -> (&'static str, usize, usize, usize) {
    match model {
        ModelName::CifarResNet(_) => ("CIFAR-10", 3, 32, 10),
        ModelName::ImageNetResNet(_) => ("ImageNet", 3, 224, 1000),
        ModelName::ThreeC1F => ("Fashion-MNIST", 1, 28, 10),
        ModelName::UNet => ("LGG brain MRI", 3, 256, 1),
        ModelName::SmallCnn | ModelName::Mlp => ("the synthetic set", 1, 12, 4),
    }
}

/// `compare`.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Run directories (each with a metrics.csv).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Output PNG.
    #[arg(long, default_value = "compare.png")]
    pub out: PathBuf,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        None => crate::demo::run_cli(&DemoArgs::default()),
        Some(Command::Demo(d)) => crate::demo::run_cli(&d),
        Some(Command::Classify(c)) => print_outcome(run_training("classify", c)?),
        Some(Command::Segment(c)) => print_outcome(run_training("segment", c)?),
        Some(Command::Info(i)) => {
            print!("{}", info(&i)?);
            Ok(())
        }
        Some(Command::Compare(c)) => {
            crate::plot::compare(&c.runs, &c.out)?;
            println!("wrote {}", c.out.display());
            Ok(())
        }
    }
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
            args.out = dir.clone();
            args.max_steps = cmd.args.max_steps;
            args.time_budget = cmd.args.time_budget;
            (args, true)
        }
        None => (cmd.args, false),
    };
    args.validate()?;
    let model: ModelName = args.model.parse()?;
    if (command == "segment") != model.is_segmenter() {
        return Err(format!("`{command}` cannot train --model {model}: use classify for classifiers and segment for unet"));
    }
    let workers = start_workers(&args)?;
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
        outcome.summary = Some(summary(&outcome, model.is_segmenter(), &args.out));
    }
    Ok(outcome)
}

/// Prints the run's summary line on rank 0 (the only rank that writes).
fn print_outcome(outcome: Outcome) -> Result<(), String> {
    if let Some(line) = &outcome.summary {
        println!("{line}");
    }
    Ok(())
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

/// The `info` report: the input shape assumed, the parameter count and the preconditioned
/// layers with their shapes.
pub fn info(args: &InfoArgs) -> Result<String, String> {
    type B = burn::backend::Flex;
    let device = Default::default();
    let capture = CaptureHandle::new();
    let model: ModelName = args.model.parse()?;
    let (setting, channels, side, classes) = native_shape(model);
    let given = args.channels.is_some() || args.image_size.is_some() || args.classes.is_some();
    let channels = args.channels.unwrap_or(channels);
    let side = args.image_size.unwrap_or(side);
    let classes = args.classes.unwrap_or(classes);
    let (params, layers) = if model.is_segmenter() {
        let m = build_segmenter::<B>(model, channels, args.init_features, &capture, &device)?;
        (
            trainable_params::<B, _>(&m),
            preconditioned_layers::<B, _>(&m),
        )
    } else {
        let mut spec = ClassifierSpec::new(channels, side, classes);
        spec.conv_bias = args.conv_bias;
        let m = Classifier::<B>::build(model, &spec, &capture, &device)?;
        (
            trainable_params::<B, _>(&m),
            preconditioned_layers::<B, _>(&m),
        )
    };
    let shape = if model.is_segmenter() {
        format!("{channels}x{side}x{side} inputs, 1-channel masks")
    } else {
        format!("{channels}x{side}x{side} inputs, {classes} classes")
    };
    let assumed = if given {
        format!("input as given: {shape}")
    } else {
        format!("input as in {setting}: {shape} (--channels, --image-size, --classes to change)")
    };
    let mut out = format!(
        "{model}: {params} parameters, {} preconditioned layers; {assumed}\n",
        layers.len()
    );
    for layer in &layers {
        out.push_str(&format!("  {layer}\n"));
    }
    Ok(out)
}
