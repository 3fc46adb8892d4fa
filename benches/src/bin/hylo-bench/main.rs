//! `hylo-bench`: measures the curvature work, preconditioning, training steps, communication,
//! state memory, data loading and time to accuracy; prints markdown and writes JSON.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Parser;
use hylo_benches::comm::{comm_volume, state_memory};
use hylo_benches::layers::{resnet32_cases, resnet50_cases, time_layer, LayerCase, LayerTiming};
use hylo_benches::steps::{cifar_loading, resnet32_steps};
use hylo_models::{trainable_params, CifarResNetConfig, ImageNetResNetConfig};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "hylo-bench",
    about = "Benchmark report of HyLo, SNGD and K-FAC"
)]
pub struct Args {
    /// Smaller shapes and fewer repeats (under 5 minutes on a 2-core CPU); the report says so.
    #[arg(long)]
    pub quick: bool,
    /// JSON output.
    #[arg(long, default_value = "bench.json")]
    pub json: PathBuf,
    /// Seconds per optimizer of the time-to-accuracy run.
    #[arg(long)]
    pub budget: Option<f64>,
    /// cpu, wgpu, cuda or cuda:N (GPU backends need the matching Cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// ResNet-32 batch of the step timings (default: 128, or 16 with --quick).
    #[arg(long)]
    pub step_batch: Option<usize>,
    /// Steps between curvature refreshes in the ResNet-32 step timings (the paper's 13).
    #[arg(long, default_value_t = 13,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub step_freq: usize,
    /// ResNet-50 batches of the curvature timings (default: 32,128, or 32 with --quick).
    #[arg(long, value_delimiter = ',')]
    pub batches: Vec<usize>,
    /// Time only the ResNet-50 layers whose Kronecker factors are at most this wide (d_in' and
    /// d_out); the report lists the layers left out and its totals cover the rest.
    #[arg(long)]
    pub max_factor_dim: Option<usize>,
    /// Report the ResNet-50 layers, communication and memory only: no ResNet-32 step timings, no
    /// data-loading comparison, no time-to-accuracy run (CI's lavapipe check, whose kernel probes
    /// and demo run those steps).
    #[arg(long)]
    pub layers_only: bool,
    /// Run the convergence benchmark instead: every task with every optimizer, its defaults and
    /// a small (lr, damping) grid, over --seeds seeds (--quick: smaller sets, fewer epochs).
    #[arg(long)]
    pub convergence: bool,
    /// Convergence benchmark, sweep and batch study: reuse the runs that an interrupted sitting
    /// with the same --json finished (its journal, `<json>.runs.jsonl`, which every sitting
    /// writes run by run) instead of running them again. Only for the same build and settings:
    /// the journal does not know which code measured it.
    #[arg(long)]
    pub resume: bool,
    /// Seeds of the convergence benchmark.
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Convergence benchmark with each optimizer's defaults only (no grid): the comparison a
    /// user who passes nothing but `--optim` gets, in a fifth of the time.
    #[arg(long)]
    pub defaults_only: bool,
    /// Tasks of the convergence benchmark (default: all of mlp, small-cnn, resnet20, unet,
    /// mnist-mlp, mnist-resnet20).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Optimizers of the convergence benchmark, the sweep and the batch study (default: all of sgd, adam,
    /// neumann, kfac, sngd, hylo).
    #[arg(long, value_delimiter = ',')]
    pub optimizers: Vec<String>,
    /// Measure the scale of each layer's curvature instead: BatchNorm ResNet-20 on real digits
    /// (datasets/data/mnist-5k at 32x32), batch 64, at initialisation and after 1 and 3 epochs
    /// of SGD; per layer the largest Fisher eigenvalue of each convolution mode against the
    /// damping and SpatialMean's rows against the exact per-sample gradients. Writes the CSV to
    /// --json's path with a .csv extension.
    #[arg(long)]
    pub curvature_scale: bool,
    /// Time whole training steps beside PyTorch's (`benches/peer/torch_step.py`) instead:
    /// ResNet-32 at batch 128 and the U-Net (32 features) at batch 4 on 128x128, with SGD,
    /// K-FAC and HyLo.
    #[arg(long)]
    pub peer_steps: bool,
    /// --peer-steps: the Python that has torch, to time PyTorch's step of each model right after
    /// ours (benches/peer/torch_step.py); without it PyTorch is not measured.
    #[arg(long, value_name = "PYTHON")]
    pub torch_python: Option<PathBuf>,
    /// Time only the ResNet-32 training steps (at --step-batch, default 16) on --device, after a
    /// whole untimed pass of the same steps (GPU backends compile and autotune their kernels on
    /// first use).
    #[arg(long)]
    pub steps_only: bool,
    /// Time the CPU convolutions instead: Burn's Conv2d against CapturedConv2d's matrix
    /// products, forward and backward, per layer shape of ResNet-32 (batch 128), ResNet-50
    /// (batch 32 at 224x224; --quick: 64x64) and the U-Net (batch 4 at 128x128).
    #[arg(long)]
    pub conv: bool,
    /// Run the sensitivity sweep instead: every optimizer at five learning rates around its
    /// default (x0.1 to x10) and momenta 0 and 0.9, on an MLP on real digits, the BatchNorm
    /// ResNet-20 and the U-Net (or --tasks), over --seeds seeds; writes the plot beside --json
    /// (.png).
    #[arg(long)]
    pub sweep: bool,
    /// Run the batch-size study instead: the BatchNorm ResNet-20 on the MNIST digits at batches
    /// 32 to 512 with every optimizer, learning rates scaled with the batch, one epoch of
    /// warm-up, over --seeds seeds; writes the plot beside --json (.png).
    #[arg(long)]
    pub batch_study: bool,
    /// Print BENCHMARKS.md generated from the result files in this folder instead
    /// (benches/results).
    #[arg(long, value_name = "DIR")]
    pub markdown: Option<PathBuf>,
    /// Print the README's defaults table from this convergence result file instead
    /// (benches/results/convergence.json).
    #[arg(long, value_name = "FILE")]
    pub readme_table: Option<PathBuf>,
    /// Count the kernels launched per step on --device instead (a GPU backend): small CNN,
    /// ResNet-20 and (without --quick) ResNet-32 and the U-Net, with SGD, SNGD, HyLo and K-FAC.
    #[arg(long)]
    pub kernels: bool,
    /// --kernels: fail when a count is above this file's (JSON, as --kernels writes).
    #[arg(long, value_name = "FILE")]
    pub kernel_budget: Option<PathBuf>,
    /// A probe of --kernels: runs this hylo-train command line.
    #[arg(long, hide = true)]
    pub kernel_probe: Option<String>,
}

#[derive(Serialize)]
struct LayerRow {
    case: LayerCase,
    batch: usize,
    timing: LayerTiming,
}

#[derive(Serialize, Default)]
struct Report {
    quick: bool,
    settings: String,
    layers: Vec<LayerRow>,
    steps: Vec<hylo_benches::steps::StepTiming>,
    comm: Vec<hylo_benches::comm::CommVolume>,
    memory: Vec<(String, hylo_benches::comm::StateMemory)>,
    loading: Option<hylo_benches::steps::LoadTiming>,
    demo: Vec<(String, f64, Option<f64>, f64)>,
}

fn ms(s: f64) -> String {
    format!("{:.2}", s * 1e3)
}

fn device_arg(args: &Args) -> hylo_train::device::DeviceArg {
    args.device.parse().expect("checked in main")
}

/// mimalloc: a training step allocates and frees tensors of up to tens of megabytes, which
/// glibc's malloc maps and unmaps from the kernel each time (page faults made a small model's
/// optimizer step 2-3x slower).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod studies;

fn main() {
    let args = Args::parse();
    let device: hylo_train::device::DeviceArg = match args.device.parse() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: --device: {e}");
            std::process::exit(2);
        }
    };
    if args.conv {
        conv_report(&args);
        return;
    }
    if args.peer_steps {
        or_exit(peer_steps(&args));
        return;
    }
    if args.curvature_scale {
        or_exit(curvature_scale(&args));
        return;
    }
    if let Some(line) = &args.kernel_probe {
        or_exit(studies::kernel_probe(line));
        return;
    }
    if args.kernels {
        or_exit(studies::kernels(&args));
        return;
    }
    if let Some(path) = &args.readme_table {
        print!("{}", or_exit(hylo_benches::results::readme_table(path)));
        return;
    }
    if let Some(dir) = &args.markdown {
        print!("{}", or_exit(hylo_benches::results::benchmarks_md(dir)));
        return;
    }
    if args.batch_study {
        or_exit(studies::batch_study(&args));
        return;
    }
    if args.sweep {
        or_exit(studies::sweep(&args));
        return;
    }
    if args.convergence {
        or_exit(studies::convergence(&args));
        return;
    }
    let result: Result<(), String> = hylo_train::with_backend!(device, |B, dev| {
        if args.steps_only {
            steps_only::<B>(&args, &dev)
        } else {
            report::<B>(&args, &dev);
            Ok(())
        }
    });
    or_exit(result);
}

fn report<B: burn::tensor::backend::AutodiffBackend>(args: &Args, device: &B::Device) {
    // On a GPU backend the first call of a kernel compiles it: quick mode then times each
    // measurement after a warm-up call too (`seconds` warms up when repeats > 1).
    let gpu = !matches!(device_arg(args), hylo_train::device::DeviceArg::Cpu);
    let (image, mut batches, repeats, mut step_batch) = if args.quick {
        (64, vec![32], if gpu { 2 } else { 1 }, 16)
    } else {
        (224, vec![32, 128], 2, 128)
    };
    if !args.batches.is_empty() {
        batches = args.batches.clone();
    }
    if let Some(b) = args.step_batch {
        step_batch = b;
    }
    let freq = args.step_freq;
    let rho = 0.1;
    let device_name = or_exit(hylo_train::device::describe(
        args.device.parse().expect("parsed in main"),
    ));
    let mut md = String::new();
    let mut report = Report {
        quick: args.quick,
        settings: format!(
            "ResNet-50 layer shapes at {image}x{image} input, batches {batches:?}; {}; rho {rho}; SpatialMean convolutions; f32 on {device_name}",
            if args.layers_only {
                "layers only (`--layers-only`: no ResNet-32 steps, no time-to-accuracy run)".to_string()
            } else {
                format!("ResNet-32 steps at batch {step_batch}, freq {freq}")
            }
        ),
        ..Default::default()
    };
    writeln!(
        md,
        "# hylo-bench report{}\n\n{}\n",
        if args.quick {
            " (quick mode: smaller shapes)"
        } else {
            ""
        },
        report.settings
    )
    .unwrap();

    // 1 and 2: per-layer curvature work and preconditioning.
    let (cases, skipped): (Vec<LayerCase>, Vec<LayerCase>) =
        resnet50_cases(image).into_iter().partition(|c| {
            args.max_factor_dim
                .is_none_or(|max| c.d_in.max(c.d_out) <= max)
        });
    if !skipped.is_empty() {
        let names = skipped
            .iter()
            .map(|c| c.shape.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        writeln!(
            md,
            "Layers with a factor wider than {} not timed (`--max-factor-dim`), so the totals below leave them out: {names}.\n",
            args.max_factor_dim.unwrap_or_default(),
        )
        .unwrap();
        report.settings += &format!("; layers left out: {names}");
    }
    let mut eigen_cache = HashMap::new();
    for &n in &batches {
        writeln!(
            md,
            "## ResNet-50 curvature per refresh, batch {n} (ms; x count = layers of that shape)\n"
        )
        .unwrap();
        writeln!(md, "| layer shape | count | K-FAC factors | K-FAC eigh | K-FAC | K-FAC inverses | K-FAC (inverse method) | SNGD | HyLo-KID | HyLo-KIS | apply K-FAC | apply K-FAC (inverse) | apply SNGD | apply HyLo |").unwrap();
        writeln!(
            md,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        )
        .unwrap();
        let mut total = LayerTiming::default();
        let layer_count: usize = cases.iter().map(|c| c.count).sum();
        let progress = bar(cases.len() as u64, &format!("ResNet-50 layers, batch {n}"));
        for case in &cases {
            progress.set_message(format!("batch {n}: {}", case.shape));
            let t = time_layer::<B::InnerBackend>(case, n, rho, repeats, &mut eigen_cache, device);
            progress.inc(1);
            let k = case.count as f64;
            total.kfac_factors += k * t.kfac_factors;
            total.kfac_eigen += k * t.kfac_eigen;
            total.kfac_inverse += k * t.kfac_inverse;
            total.apply_kfac_inverse += k * t.apply_kfac_inverse;
            total.sngd += k * t.sngd;
            total.kid += k * t.kid;
            total.kis += k * t.kis;
            total.apply_kfac += k * t.apply_kfac;
            total.apply_sngd += k * t.apply_sngd;
            total.apply_hylo += k * t.apply_hylo;
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                case.shape,
                case.count,
                ms(t.kfac_factors),
                ms(t.kfac_eigen),
                ms(t.kfac()),
                ms(t.kfac_inverse),
                ms(t.kfac_inverse_refresh()),
                ms(t.sngd),
                ms(t.kid),
                ms(t.kis),
                ms(t.apply_kfac),
                ms(t.apply_kfac_inverse),
                ms(t.apply_sngd),
                ms(t.apply_hylo)
            )
            .unwrap();
            report.layers.push(LayerRow {
                case: case.clone(),
                batch: n,
                timing: t,
            });
        }
        progress.finish_and_clear();
        eprintln!(
            "ResNet-50 curvature, batch {n}: K-FAC {:.1} s (factors {:.1} s, eigh {:.1} s; inverse method {:.1} s), HyLo-KID {:.2} s, HyLo-KIS {:.2} s per refresh",
            total.kfac(),
            total.kfac_factors,
            total.kfac_eigen,
            total.kfac_inverse_refresh(),
            total.kid,
            total.kis
        );
        writeln!(
            md,
            "| **total ({layer_count} layers)** | | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            ms(total.kfac_factors),
            ms(total.kfac_eigen),
            ms(total.kfac()),
            ms(total.kfac_inverse),
            ms(total.kfac_inverse_refresh()),
            ms(total.sngd),
            ms(total.kid),
            ms(total.kis),
            ms(total.apply_kfac),
            ms(total.apply_kfac_inverse),
            ms(total.apply_sngd),
            ms(total.apply_hylo)
        )
        .unwrap();
        writeln!(md, "\nRefresh ratio K-FAC / HyLo: {:.1}x against KID, {:.1}x against KIS; K-FAC / SNGD {:.1}x. With K-FAC's inverse method: {:.1}x against KID, {:.1}x against KIS.\n", total.kfac() / total.kid, total.kfac() / total.kis, total.kfac() / total.sngd, total.kfac_inverse_refresh() / total.kid, total.kfac_inverse_refresh() / total.kis).unwrap();
    }

    // 3: ResNet-32 steps.
    if !args.layers_only {
        resnet32_step_report::<B>(&mut md, &mut report, step_batch, freq, device);
    }
    communication_and_memory(&mut md, &mut report, &cases, rho);
    if !args.layers_only {
        time_to_accuracy(&mut md, &mut report, args);
    }
    print!("{md}");
    match serde_json::to_string_pretty(&report) {
        Ok(json) => {
            if let Err(e) = std::fs::write(&args.json, json) {
                eprintln!("error: {}: {e}", args.json.display());
                std::process::exit(2);
            }
        }
        Err(e) => eprintln!("error: {e}"),
    }
}

/// The report's ResNet-32 step timings and the data loading against an SGD step.
fn resnet32_step_report<B: burn::tensor::backend::AutodiffBackend>(
    md: &mut String,
    report: &mut Report,
    step_batch: usize,
    freq: usize,
    device: &B::Device,
) {
    let progress = bar(5 + 3 * (freq as u64 + 1), "ResNet-32 steps");
    let steps = resnet32_steps::<B>(step_batch, freq, device, &progress);
    progress.finish_and_clear();
    let sgd = steps[0].amortised;
    writeln!(
        md,
        "## ResNet-32 training step, batch {step_batch}, refresh every {freq} steps (ms)\n"
    )
    .unwrap();
    writeln!(md, "| optimizer | refresh step | other steps | amortised | overhead vs SGD | host reads: refresh step | host reads: other steps |\n|---|---|---|---|---|---|---|").unwrap();
    for s in &steps {
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.2}x | {} | {} |",
            s.optimizer,
            ms(s.refresh_step),
            ms(s.plain_step),
            ms(s.amortised),
            s.amortised / sgd,
            s.reads_refresh_step,
            s.reads_plain_step
        )
        .unwrap();
    }
    writeln!(md, "\nHost reads are the optimizer step's blocking device-to-host reads (`hylo_optim::host`): none between refreshes; a refresh reads the NaN flag, the gradient norm (HyLo), and the small matrices it factorises.").unwrap();
    report.steps = steps;
    // Data loading against the step time.
    let load = cifar_loading(step_batch);
    writeln!(md, "\n## CIFAR data loading\n\nA batch of {} (read, random crop + flip, normalise, stack): {} ms ({:.0} samples/s), against {} ms for an SGD step of ResNet-32 at the same batch: loading is {:.1}% of a step and runs on the loader thread meanwhile.\n", load.batch, ms(load.seconds_per_batch), load.samples_per_second, ms(sgd), 100.0 * load.seconds_per_batch / sgd).unwrap();
    report.loading = Some(load);
}

/// The report's communication volumes and optimizer state sizes (computed from the shapes).
fn communication_and_memory(md: &mut String, report: &mut Report, cases: &[LayerCase], rho: f64) {
    // 4: communication.
    let local = 32;
    writeln!(
        md,
        "\n## Communication per refresh, ResNet-50, local batch {local}, rho {rho} (MB, f32)\n\n\
         Computed from the layer shapes, not measured: K-FAC (KAISA) all-reduces its factors, \
         sum (d_in'^2 + d_out^2) floats; HyLo all-gathers r P (d_in' + d_out) floats and \
         broadcasts (r P)^2 per layer (ALGORITHMS.md, \"Distributed HyLo\").\n"
    )
    .unwrap();
    writeln!(
        md,
        "| workers | K-FAC (KAISA) | HyLo | K-FAC / HyLo |\n|---|---|---|---|"
    )
    .unwrap();
    for p in [1, 8, 16, 32, 64] {
        let v = comm_volume(cases, p, local, rho);
        writeln!(
            md,
            "| {p} | {:.1} | {:.1} | {:.1}x |",
            v.kfac_bytes as f64 / 1e6,
            v.hylo_bytes as f64 / 1e6,
            v.ratio()
        )
        .unwrap();
        report.comm.push(v);
    }

    // 5: state memory.
    writeln!(md, "\n## Optimizer state after a refresh (MB, f32)\n").unwrap();
    writeln!(
        md,
        "| model | batch | momentum | K-FAC | SNGD | HyLo |\n|---|---|---|---|---|---|"
    )
    .unwrap();
    let capture = hylo_optim::CaptureHandle::new();
    let r32 = CifarResNetConfig::new(32)
        .init::<burn::backend::Flex>(&capture, &Default::default())
        .unwrap();
    let r50 = ImageNetResNetConfig::new(50)
        .init::<burn::backend::Flex>(&capture, &Default::default())
        .unwrap();
    for (name, cases, params, n) in [
        (
            "ResNet-32",
            resnet32_cases(),
            trainable_params::<burn::backend::Flex, _>(&r32),
            128,
        ),
        (
            "ResNet-50",
            cases.to_vec(),
            trainable_params::<burn::backend::Flex, _>(&r50),
            32,
        ),
    ] {
        let m = state_memory(&cases, params, n, rho);
        writeln!(
            md,
            "| {name} | {n} | {:.1} | {:.1} | {:.1} | {:.1} |",
            m.momentum as f64 / 1e6,
            m.kfac as f64 / 1e6,
            m.sngd as f64 / 1e6,
            m.hylo as f64 / 1e6
        )
        .unwrap();
        report.memory.push((name.into(), m));
    }
}

/// The report's time-to-accuracy run: the demo on the report's device.
fn time_to_accuracy(md: &mut String, report: &mut Report, args: &Args) {
    // 6: time to accuracy.
    let budget = args.budget.unwrap_or(if args.quick { 5.0 } else { 30.0 });
    let dir = tempfile::tempdir().expect("temp dir");
    let demo = hylo_train::demo::DemoArgs {
        budget,
        out: dir.path().to_path_buf(),
        device: args.device.clone(),
        ..Default::default()
    };
    eprintln!(
        "time to accuracy: {budget:.0} s per optimizer on {}",
        args.device
    );
    match hylo_train::demo::run(&demo) {
        Ok(results) => {
            writeln!(md, "## Time to accuracy: the demo (small CNN on the MNIST digits), {budget:.0} s per optimizer\n\n{}", hylo_train::demo::table(&results, demo.target)).unwrap();
            report.demo = results
                .iter()
                .map(|r| {
                    (
                        format!("{:?}", r.optimizer).to_lowercase(),
                        r.final_accuracy,
                        r.time_to_target,
                        r.ms_per_step,
                    )
                })
                .collect();
        }
        Err(e) => writeln!(md, "time-to-accuracy run failed: {e}").unwrap(),
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal; the report goes to stdout).
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{msg:40} {wide_bar} {pos}/{len} {elapsed_precise}")
            .expect("a valid template"),
    );
    pb.set_message(what.to_string());
    pb
}

/// `--conv`: per-layer CPU convolution timings of ResNet-32, ResNet-50 and the U-Net.
fn conv_report(args: &Args) {
    use hylo_benches::conv::{conv_cases, markdown, time_conv};
    use hylo_benches::layers::unet_cases;
    let image = if args.quick { 64 } else { 224 };
    let repeats = if args.quick { 1 } else { 3 };
    let models: Vec<(String, Vec<LayerCase>, usize)> = vec![
        (
            "ResNet-32, batch 128 (32x32)".into(),
            conv_cases(resnet32_cases()),
            128,
        ),
        (
            format!("ResNet-50, batch 32 ({image}x{image})"),
            conv_cases(resnet50_cases(image)),
            32,
        ),
        (
            "U-Net (32 features), batch 4 (128x128)".into(),
            conv_cases(unet_cases(32, 128)),
            4,
        ),
    ];
    let total: usize = models.iter().map(|m| m.1.len()).sum();
    let pb = bar(total as u64, "convolutions");
    let mut md = format!(
        "# CPU convolutions: Burn's Conv2d against CapturedConv2d's matrix products\n\n\
         Milliseconds per layer (the minimum of {repeats} runs), forward and backward (input and \
         weight gradients); f32 on Flex, {} threads.\n\n",
        rayon_threads()
    );
    let mut all = Vec::new();
    for (title, cases, batch) in &models {
        let mut timings = Vec::new();
        for case in cases {
            pb.set_message(format!("{title}: {}", case.shape));
            timings.push(time_conv(case, *batch, repeats));
            pb.inc(1);
        }
        md.push_str(&markdown(title, &timings));
        md.push('\n');
        all.push((title.clone(), timings));
    }
    pb.finish_and_clear();
    print!("{md}");
    if let Err(e) = std::fs::write(
        &args.json,
        serde_json::to_string_pretty(&all).unwrap_or_default(),
    ) {
        eprintln!("error: {}: {e}", args.json.display());
    }
    // Timings of wrong results mean nothing: every layer must agree with Burn's.
    let wrong: Vec<String> = all
        .iter()
        .flat_map(|(title, timings)| timings.iter().map(move |t| (title, t)))
        .filter(|(_, t)| t.max_rel_err.is_nan() || t.max_rel_err >= 1e-4)
        .map(|(title, t)| {
            format!(
                "{title}: {} (relative error {:.1e})",
                t.shape, t.max_rel_err
            )
        })
        .collect();
    if !wrong.is_empty() {
        eprintln!(
            "error: the matrix-product convolution disagrees with Burn's on {}",
            wrong.join("; ")
        );
        std::process::exit(1);
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `--curvature-scale`: the diagnostics CSV and its table.
fn curvature_scale(args: &Args) -> Result<(), String> {
    use hylo_benches::curvature_scale::{csv, markdown, measure};
    let steps = if args.quick {
        vec![0, 62]
    } else {
        vec![0, 62, 186]
    };
    let pb = bar(1, "curvature scale: ResNet-20 on MNIST digits");
    let rows = measure(64, &steps)?;
    pb.finish_and_clear();
    let path = args.json.with_extension("csv");
    std::fs::write(&path, csv(&rows)).map_err(|e| format!("{}: {e}", path.display()))?;
    write_json(&args.json, &rows)?;
    println!(
        "# Curvature scale: ResNet-20 (BatchNorm) on MNIST digits at 32x32, batch 64\n\n\
         SGD steps taken before each measurement (62 = one epoch of the 4,000 digits); the damping \
         of `--damping auto` starts at 1. CSV: {}\n\n{}",
        path.display(),
        markdown(&rows, 1.0)
    );
    Ok(())
}

/// `--peer-steps`: ResNet-32 and U-Net steps of SGD, K-FAC and HyLo on the CPU, with PyTorch's
/// beside them when `--torch-python` is given; the table on stdout, the JSON to `--json`.
fn peer_steps(args: &Args) -> Result<(), String> {
    use hylo_benches::peer;
    let pb = bar(peer::MEASURED_STEPS, "training steps");
    let models = peer::measure(args.torch_python.as_deref(), &pb)?;
    pb.finish_and_clear();
    print!("{}", peer::markdown(&models));
    write_json(&args.json, &models)
}

/// Writes `value` as pretty JSON to `path`.
fn write_json<T: Serialize>(path: &std::path::Path, value: &T) -> Result<(), String> {
    let json = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(path, json).map_err(|e| format!("{}: {e}", path.display()))
}

/// `--steps-only`: the ResNet-32 step table alone, timed on a second pass; the JSON to `--json`.
fn steps_only<B: burn::tensor::backend::AutodiffBackend>(
    args: &Args,
    device: &B::Device,
) -> Result<(), String> {
    use hylo_benches::steps::DeviceSteps;
    let batch = args.step_batch.unwrap_or(16);
    let freq = args.step_freq;
    let pb = bar(
        2 * (5 + 3 * (freq as u64 + 1)),
        "ResNet-32 steps (warm-up pass, then timed)",
    );
    let _warm_up = resnet32_steps::<B>(batch, freq, device, &pb);
    let steps = resnet32_steps::<B>(batch, freq, device, &pb);
    pb.finish_and_clear();
    let table = DeviceSteps {
        device: args.device.clone(),
        release: !cfg!(debug_assertions),
        batch,
        freq,
        steps,
    };
    print!("{}", table.markdown());
    write_json(&args.json, &table)
}

/// The value of `result`, or its error on stderr and exit status 2.
fn or_exit<T>(result: Result<T, String>) -> T {
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2)
    })
}
