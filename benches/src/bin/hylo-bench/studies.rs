//! The studies of `hylo-bench` that train whole runs: the convergence benchmark
//! (`--convergence`) and the sensitivity sweep (`--sweep`).

use serde::Serialize;

use hylo_benches::convergence::{
    grid, markdown, run, summarize, tasks, RunResult, Setting, Task, OPTIMIZERS,
};

use hylo_benches::journal::Journal;
use hylo_benches::results::task_lines;

use crate::{bar, Args};

/// Runs every `(task, optimizer, setting, seed)` of `plan` in a temporary directory, with a
/// progress bar.
fn run_plan(
    plan: Vec<(&Task, &str, Setting, u64)>,
    args: &Args,
    what: &str,
) -> Result<Vec<RunResult>, String> {
    let progress = bar(plan.len() as u64, what);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    // Every finished run goes into the journal at once: an interrupted sitting keeps it, and
    // `--resume` takes it from there instead of running it again.
    let mut journal = Journal::open(Journal::path_for(&args.json), args.resume)?;
    if !journal.is_empty() {
        eprintln!(
            "--resume: {} finished runs in {}",
            journal.len(),
            Journal::path_for(&args.json).display()
        );
    }
    let mut results = Vec::new();
    for (i, (task, optimizer, setting, seed)) in plan.into_iter().enumerate() {
        progress.set_message(format!(
            "{} {optimizer} {} seed {seed}",
            task.name,
            setting.label()
        ));
        if let Some(done) = journal.find(&task.name, optimizer, &setting, seed) {
            results.push(done.clone());
        } else {
            let out = dir.path().join(i.to_string());
            let result = run(task, optimizer, &setting, seed, &args.device, &out)?;
            journal.record(&result)?;
            results.push(result);
            let _ = std::fs::remove_dir_all(&out);
        }
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(results)
}

/// The tasks named in `--tasks` (all of `default` when it is empty).
fn chosen_tasks(args: &Args, default: &[&str]) -> Result<Vec<Task>, String> {
    let all = tasks(args.quick);
    let names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
    let wanted: Vec<String> = if args.tasks.is_empty() {
        default.iter().map(|s| s.to_string()).collect()
    } else {
        args.tasks.clone()
    };
    let chosen: Vec<Task> = all
        .iter()
        .filter(|t| wanted.contains(&t.name))
        .cloned()
        .collect();
    if chosen.len() != wanted.len() {
        return Err(format!(
            "--tasks: expected names among {names:?}, got {wanted:?}"
        ));
    }
    Ok(chosen)
}

/// The optimizers named in `--optimizers` (all of them when it is empty), in the benchmark's
/// order.
fn chosen_optimizers(args: &Args) -> Result<Vec<&'static str>, String> {
    if let Some(bad) = args
        .optimizers
        .iter()
        .find(|o| !OPTIMIZERS.contains(&o.as_str()))
    {
        return Err(format!(
            "--optimizers: expected names among {OPTIMIZERS:?}, got {bad:?}"
        ));
    }
    Ok(OPTIMIZERS
        .into_iter()
        .filter(|o| args.optimizers.is_empty() || args.optimizers.iter().any(|a| a == o))
        .collect())
}

/// The task list of a report: each one's command line and target.
fn write_json(args: &Args, value: &impl Serialize) -> Result<(), String> {
    let json = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(&args.json, json).map_err(|e| format!("{}: {e}", args.json.display()))
}

/// `--convergence`: every task, optimizer, setting and seed; a markdown table and JSON.
pub fn convergence(args: &Args) -> Result<(), String> {
    let device = hylo_train::device::describe(args.device.parse()?)?;
    let all: Vec<String> = tasks(false).into_iter().map(|t| t.name).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let tasks = chosen_tasks(args, &all)?;
    let optimizers = chosen_optimizers(args)?;
    let mut plan = Vec::new();
    for task in &tasks {
        for &optimizer in &optimizers {
            let mut settings = vec![Setting::DEFAULTS];
            if !args.defaults_only {
                settings.extend(grid(optimizer, task.command == "segment"));
            }
            for setting in settings {
                for seed in 0..args.seeds {
                    plan.push((task, optimizer, setting.clone(), seed));
                }
            }
        }
    }
    let results = run_plan(plan, args, "convergence runs")?;
    let summaries = summarize(&results);
    let total: f64 = results.iter().map(|r| r.wall_s).sum();
    print!(
        "# hylo-bench convergence{}\n\nOn {device}; tasks:\n\n{}\n{}\n{} runs, {:.0} s of \
         training.\n",
        if args.quick { " (quick)" } else { "" },
        task_lines(&tasks, false),
        markdown(&summaries, &tasks, args.seeds as usize),
        results.len(),
        total
    );
    #[derive(Serialize)]
    struct ConvergenceReport<'a> {
        tasks: &'a [Task],
        runs: &'a [RunResult],
        summaries: &'a [hylo_benches::convergence::Summary],
    }
    write_json(
        args,
        &ConvergenceReport {
            tasks: &tasks,
            runs: &results,
            summaries: &summaries,
        },
    )
}

/// `--sweep`: every optimizer over the learning rates and momenta of the sensitivity sweep, on
/// its three tasks; a markdown table, `sweep.png` beside the JSON, and the JSON.
pub fn sweep(args: &Args) -> Result<(), String> {
    use hylo_benches::sweep::{curves, markdown, plot, settings, SWEEP_TASKS};
    let device = hylo_train::device::describe(args.device.parse()?)?;
    let tasks = chosen_tasks(args, &SWEEP_TASKS)?;
    let optimizers = chosen_optimizers(args)?;
    let mut plan = Vec::new();
    for task in &tasks {
        for &optimizer in &optimizers {
            for setting in settings(optimizer) {
                for seed in 0..args.seeds {
                    plan.push((task, optimizer, setting.clone(), seed));
                }
            }
        }
    }
    let results = run_plan(plan, args, "sweep runs")?;
    let curves = curves(&results);
    let png = args.json.with_extension("png");
    plot(&curves, &tasks, &png)?;
    print!(
        "# hylo-bench sweep{}\n\nOn {device}; tasks:\n\n{}\n{}\nPlot: {}\n",
        if args.quick { " (quick)" } else { "" },
        task_lines(&tasks, false),
        markdown(&curves, args.seeds as usize),
        png.display()
    );
    #[derive(Serialize)]
    struct SweepReport<'a> {
        tasks: &'a [Task],
        runs: &'a [RunResult],
        curves: &'a [hylo_benches::sweep::Curve],
    }
    write_json(
        args,
        &SweepReport {
            tasks: &tasks,
            runs: &results,
            curves: &curves,
        },
    )
}

/// `--batch-study`: every optimizer at every batch of the batch-size study; a markdown table,
/// `batch.png` beside the JSON, and the JSON.
pub fn batch_study(args: &Args) -> Result<(), String> {
    use hylo_benches::batch::{markdown, plot, points, setting, task, BATCHES};
    let device = hylo_train::device::describe(args.device.parse()?)?;
    let tasks: Vec<Task> = BATCHES.iter().map(|b| task(*b)).collect();
    let optimizers = chosen_optimizers(args)?;
    let mut plan = Vec::new();
    for (task, batch) in tasks.iter().zip(BATCHES) {
        for &optimizer in &optimizers {
            for seed in 0..args.seeds {
                plan.push((task, optimizer, setting(optimizer, batch), seed));
            }
        }
    }
    let results = run_plan(plan, args, "batch-size runs")?;
    let points = points(&results);
    let png = args.json.with_extension("png");
    plot(&points, &png)?;
    print!(
        "# hylo-bench batch study\n\nOn {device}; tasks:\n\n{}\n{}\nPlot: {}\n",
        task_lines(&tasks, false),
        markdown(&points, args.seeds as usize),
        png.display()
    );
    #[derive(Serialize)]
    struct BatchReport<'a> {
        tasks: &'a [Task],
        runs: &'a [RunResult],
        points: &'a [hylo_benches::batch::Point],
    }
    write_json(
        args,
        &BatchReport {
            tasks: &tasks,
            runs: &results,
            points: &points,
        },
    )
}

/// `--kernels`: kernels launched and bytes moved between host and device by a plain and a
/// refreshing step of each model and optimizer on `--device` (a GPU backend), from three probe
/// processes each; checked against `--kernel-budget` when given (a count above it fails).
pub fn kernels(args: &Args) -> Result<(), String> {
    use hylo_benches::kernels::{
        count_launches, cubecl_toml, markdown, models, over_budget, probe_args, KernelTable,
        StepKernels, FREQ, OPTIMIZERS, TRAFFIC_FILE,
    };
    use hylo_optim::host::Traffic;
    let device = hylo_train::device::describe(args.device.parse()?)?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let log = dir.path().join("kernels.log");
    let traffic = dir.path().join(TRAFFIC_FILE);
    std::fs::write(dir.path().join("cubecl.toml"), cubecl_toml(&log)).map_err(|e| e.to_string())?;
    let models = models(args.quick);
    let progress = bar(
        (models.len() * OPTIMIZERS.len() * 3) as u64,
        "kernel probes",
    );
    let mut table = KernelTable::new();
    for (model, line) in &models {
        for optimizer in OPTIMIZERS {
            progress.set_message(format!("{model} {optimizer}"));
            let count = |steps: u64| -> Result<(u64, Vec<Traffic>), String> {
                let _ = std::fs::remove_file(&log);
                let _ = std::fs::remove_file(&traffic);
                let out = dir.path().join(format!("run-{model}-{optimizer}-{steps}"));
                let status = std::process::Command::new(&exe)
                    .current_dir(dir.path())
                    .arg("--kernel-probe")
                    .arg(probe_args(line, optimizer, steps, &args.device, &out))
                    .status()
                    .map_err(|e| e.to_string())?;
                if !status.success() {
                    return Err(format!(
                        "the probe of {model} {optimizer} ({steps} steps) failed"
                    ));
                }
                progress.inc(1);
                let train_log = std::fs::read_to_string(out.join("train.log")).unwrap_or_default();
                if train_log.contains("period rejected") {
                    return Err(format!(
                        "the probe of {model} {optimizer} ({steps} steps) rejected a period: its \
                         count would not be a refresh's"
                    ));
                }
                let text = std::fs::read_to_string(&log)
                    .map_err(|e| format!("{}: {e} (no kernel log)", log.display()))?;
                let moved = std::fs::read_to_string(&traffic)
                    .map_err(|e| e.to_string())
                    .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
                    .map_err(|e| format!("{}: {e} (no traffic)", traffic.display()))?;
                Ok((count_launches(&text), moved))
            };
            let (before, _) = count(FREQ - 1)?;
            let (plain, _) = count(FREQ)?;
            let (at, moved) = count(FREQ + 1)?;
            let bytes = |step: u64| {
                moved.get(step as usize).map(Traffic::bytes).ok_or_else(|| {
                    format!(
                        "the probe of {model} {optimizer} reported {} steps' traffic, expected {}",
                        moved.len(),
                        FREQ + 1
                    )
                })
            };
            table.entry(model.to_string()).or_default().insert(
                optimizer.into(),
                StepKernels {
                    plain: plain.saturating_sub(before),
                    refresh: at.saturating_sub(plain),
                    plain_bytes: bytes(FREQ - 1)?,
                    refresh_bytes: bytes(FREQ)?,
                },
            );
        }
    }
    progress.finish_and_clear();
    print!(
        "# Kernels per step on {device}\n\nCubeCL's log of every kernel launched, a step counted \
         as the difference between runs of k + 1 and k steps (refresh every {FREQ} steps, batch \
         4); bytes moved between host and device through `hylo_optim::host` (the optimizer's \
         reads and uploads; the batches' uploads are not counted).\n\n{}",
        markdown(&table)
    );
    write_json(args, &table)?;
    if let Some(path) = &args.kernel_budget {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let budget: KernelTable =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let over = over_budget(&table, &budget);
        if !over.is_empty() {
            return Err(format!(
                "kernels per step over the budget of {} (raise it there on purpose): {}",
                path.display(),
                over.join("; ")
            ));
        }
    }
    Ok(())
}

/// `--kernel-probe LINE`: runs the `hylo-train` command LINE (a probe of `--kernels`) and waits
/// for CubeCL's logger to write what it was sent.
pub fn kernel_probe(line: &str) -> Result<(), String> {
    use clap::Parser;
    use hylo_train::app::{run_training, Cli, Command};
    let cli = Cli::try_parse_from(std::iter::once("hylo-train").chain(line.split_whitespace()))
        .map_err(|e| e.to_string())?;
    let (command, cmd) = match cli.command {
        Some(Command::Classify(c)) => ("classify", c),
        Some(Command::Segment(c)) => ("segment", c),
        _ => return Err(format!("not a training command: {line}")),
    };
    let outcome = run_training(command, cmd)?;
    // Each step's host<->device traffic, for the parent (in its working folder, ours).
    let json = serde_json::to_string(&outcome.traffic_per_step).map_err(|e| e.to_string())?;
    std::fs::write(hylo_benches::kernels::TRAFFIC_FILE, json).map_err(|e| e.to_string())?;
    // The logger writes from its own task: give it time to drain.
    std::thread::sleep(std::time::Duration::from_millis(500));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn chosen(line: &str) -> Result<Vec<&'static str>, String> {
        chosen_optimizers(&Args::parse_from(line.split_whitespace()))
    }

    #[test]
    fn optimizers_are_chosen_in_the_benchmarks_order_and_a_bad_name_is_refused() {
        assert_eq!(chosen("hylo-bench --convergence").unwrap(), OPTIMIZERS);
        assert_eq!(
            chosen("hylo-bench --convergence --optimizers hylo,sgd").unwrap(),
            ["sgd", "hylo"]
        );
        let err = chosen("hylo-bench --convergence --optimizers hylo,lbfgs").unwrap_err();
        assert!(
            err.contains("--optimizers") && err.contains("lbfgs"),
            "{err}"
        );
    }
}
