//! `hylo-train`: trains models with SGD, SNGD, K-FAC and HyLo. With no arguments it runs the demo.

mod demo;
mod device;

use clap::{Parser, Subcommand};
use device::DeviceArg;

#[derive(Parser, Debug)]
#[command(
    name = "hylo-train",
    about = "Natural-gradient training with HyLo, SNGD and K-FAC"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a small CNN on the synthetic set with every optimizer and print a table (the default).
    Demo(DemoCli),
}

#[derive(clap::Args, Debug)]
struct DemoCli {
    /// cpu, wgpu, cuda or cuda:N (GPU backends need the matching Cargo feature).
    #[arg(long, default_value = "cpu")]
    device: DeviceArg,
    /// Optimizer steps per method.
    #[arg(long, default_value_t = 150, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// Samples per batch.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,
    /// Training samples.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    train_samples: u64,
    /// Seed of data and weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl Default for DemoCli {
    fn default() -> Self {
        Self::try_parse_from(["demo"]).expect("defaults parse")
    }
}

impl DemoCli {
    fn args(&self) -> Result<demo::DemoArgs, String> {
        if self.batch_size > self.train_samples {
            return Err(format!(
                "--batch-size {} is larger than --train-samples {}",
                self.batch_size, self.train_samples
            ));
        }
        Ok(demo::DemoArgs {
            steps: self.steps as usize,
            batch_size: self.batch_size as usize,
            train_samples: self.train_samples as usize,
            seed: self.seed,
        })
    }
}

impl clap::Parser for DemoCli {}
impl clap::CommandFactory for DemoCli {
    fn command() -> clap::Command {
        <Self as clap::Args>::augment_args(clap::Command::new("demo"))
    }
    fn command_for_update() -> clap::Command {
        Self::command()
    }
}

fn run_demo(cli: &DemoCli) -> Result<(), String> {
    let args = cli.args()?;
    println!(
        "demo: small CNN on the synthetic set, {} steps of batch {} per optimizer, device {}",
        args.steps, args.batch_size, cli.device
    );
    let results = match cli.device {
        DeviceArg::Cpu => {
            demo::run::<burn::backend::Autodiff<burn::backend::Flex>>(&args, &Default::default())?
        }
        #[cfg(feature = "wgpu")]
        DeviceArg::Wgpu => {
            demo::run::<burn::backend::Autodiff<burn::backend::Wgpu>>(&args, &Default::default())?
        }
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda(index) => demo::run::<burn::backend::Autodiff<burn::backend::Cuda>>(
            &args,
            &burn::backend::cuda::CudaDevice::new(index),
        )?,
        #[allow(unreachable_patterns)]
        DeviceArg::Wgpu => return Err(device::not_compiled(cli.device, "wgpu")),
        #[allow(unreachable_patterns)]
        DeviceArg::Cuda(_) => return Err(device::not_compiled(cli.device, "cuda")),
    };
    print!("{}", demo::table(&results));
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        None => run_demo(&DemoCli::default()),
        Some(Command::Demo(demo)) => run_demo(&demo),
    };
    if let Err(message) = result {
        eprintln!("error: {message}");
        std::process::exit(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_and_rejects() {
        let cli = Cli::try_parse_from(["hylo-train", "demo", "--device", "cuda:1", "--steps", "5"])
            .unwrap();
        let Some(Command::Demo(d)) = cli.command else {
            panic!()
        };
        assert_eq!(d.device, DeviceArg::Cuda(1));
        assert_eq!(d.steps, 5);
        assert!(Cli::try_parse_from(["hylo-train", "demo", "--device", "tpu"]).is_err());
        assert!(Cli::try_parse_from(["hylo-train", "demo", "--steps", "0"]).is_err());
        let big = Cli::try_parse_from([
            "hylo-train",
            "demo",
            "--batch-size",
            "64",
            "--train-samples",
            "10",
        ])
        .unwrap();
        let Some(Command::Demo(d)) = big.command else {
            panic!()
        };
        assert!(d.args().unwrap_err().contains("--batch-size"));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn missing_backend_is_a_clear_error() {
        let cli = DemoCli {
            device: DeviceArg::Cuda(0),
            ..DemoCli::default()
        };
        assert!(run_demo(&cli).unwrap_err().contains("--features cuda"));
    }

    #[test]
    fn short_demo_runs_and_natural_gradient_learns() {
        let args = demo::DemoArgs {
            steps: 30,
            batch_size: 32,
            train_samples: 256,
            seed: 0,
        };
        let results =
            demo::run::<burn::backend::Autodiff<burn::backend::Flex>>(&args, &Default::default())
                .unwrap();
        assert_eq!(results.len(), 4);
        let table = demo::table(&results);
        assert!(table.contains("| hylo |") && table.contains("| kfac |"));
        for r in &results {
            assert!(r.final_loss.is_finite(), "{r:?}");
        }
    }
}
