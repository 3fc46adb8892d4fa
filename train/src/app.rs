//! The commands of `hylo-train`: classify, segment, info, compare (and the demo in `demo.rs`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use hylo_models::{
    build_segmenter, preconditioned_layers, trainable_params, Classifier, ClassifierSpec, ModelName,
};
use hylo_optim::CaptureHandle;

use crate::demo::DemoArgs;
use crate::trainer::Outcome;
pub use crate::training::{run_training, summary, TrainCommand};

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
    /// Print the training flags of classify and segment with their defaults, as a markdown
    /// table (the README's table is this output).
    Flags,
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
        Some(Command::Flags) => {
            print!("{}", flags_markdown());
            Ok(())
        }
    }
}

/// The training flags (classify, segment) as a markdown table: flag, default, what it does
/// (the first sentence of its help), generated from the command-line definition itself.
pub fn flags_markdown() -> String {
    use clap::CommandFactory;
    let cli = Cli::command();
    let classify = cli
        .find_subcommand("classify")
        .expect("classify is a subcommand");
    let mut out = String::from("| flag | default | what it sets |\n|---|---|---|\n");
    for arg in classify.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "help" {
            continue;
        }
        let switch = matches!(
            arg.get_action(),
            clap::ArgAction::SetTrue | clap::ArgAction::SetFalse
        );
        let takes_value = !switch;
        let flag = if takes_value {
            let value = arg
                .get_value_names()
                .and_then(|v| v.first().map(|s| s.to_string()))
                .unwrap_or_else(|| long.replace('-', "_").to_uppercase());
            format!("`--{long} {value}`")
        } else {
            format!("`--{long}`")
        };
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = if defaults.is_empty() {
            "-".to_string()
        } else {
            format!("`{}`", defaults.join(","))
        };
        let mut help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default()
            .replace('\n', " ")
            .replace('|', "\\|");
        let values: Vec<String> = if switch {
            Vec::new()
        } else {
            arg.get_possible_values()
        }
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| v.get_name().to_string())
        .collect();
        if !help.is_empty() && !help.ends_with('.') {
            help.push('.');
        }
        if !values.is_empty() {
            help.push_str(&format!(" One of: {}.", values.join(", ")));
        }
        out.push_str(&format!("| {flag} | {default} | {help} |\n"));
    }
    out
}

/// Prints the run's summary line on rank 0 (the only rank that writes).
fn print_outcome(outcome: Outcome) -> Result<(), String> {
    if let Some(line) = &outcome.summary {
        println!("{line}");
    }
    Ok(())
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
