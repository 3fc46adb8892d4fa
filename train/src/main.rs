//! `hylo-train`: trains models with SGD, Adam, SNGD, K-FAC and HyLo. With no arguments it runs
//! the demo.

use clap::Parser;
use hylo_train::app::{run, Cli};
use hylo_train::trainer::INTERRUPTED;

/// mimalloc: a training step allocates and frees tensors of up to tens of megabytes, which
/// glibc's malloc maps and unmaps from the kernel each time (page faults made a small model's
/// optimizer step 2-3x slower).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // A second Ctrl-C exits at once.
            std::process::exit(130);
        }
        eprintln!("interrupted: saving a checkpoint after this step (Ctrl-C again to quit now)");
    });
    if let Err(message) = run(cli) {
        eprintln!("error: {message}");
        std::process::exit(2);
    }
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        std::process::exit(130);
    }
}
