//! Every `hylo-train` command in the README is parsed by the real command line, and run (for two
//! steps, on stand-in files where it reads a dataset) in the README's order, so that a flag, a
//! default or a dataset that changes cannot leave the README behind. The flags table is the
//! output of `hylo-train flags`.

use std::path::{Path, PathBuf};

use clap::Parser;
use hylo_datasets::fixtures::{write_cifar10, write_class_folder, write_lgg, write_mask_folder};
use hylo_train::app::{flags_markdown, info, run_training, Cli, Command};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("README.md")
}

/// The command lines of the README's `sh` blocks, continuation lines joined, comments removed.
fn shell_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    let mut pending = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            inside = line.trim() == "```sh";
            continue;
        }
        if !inside {
            continue;
        }
        let code = match line.find(" #") {
            Some(i) => &line[..i],
            None if line.trim_start().starts_with('#') => "",
            None => line,
        };
        match code.trim_end().strip_suffix('\\') {
            Some(head) => pending.push_str(&format!("{head} ")),
            None => {
                pending.push_str(code);
                if !pending.trim().is_empty() {
                    out.push(pending.trim().to_string());
                }
                pending.clear();
            }
        }
    }
    out
}

/// The arguments after `hylo-train` of a line that runs it, if it does.
fn hylo_train_args(line: &str) -> Option<Vec<String>> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    assert!(
        !line.contains('"') && !line.contains('\''),
        "quotes in {line}"
    );
    if tokens.first() == Some(&"cargo") && tokens.get(1) == Some(&"run") {
        let package = tokens.windows(2).find(|w| w[0] == "-p").map(|w| w[1]);
        if package != Some("hylo-train") || tokens.contains(&"--example") {
            return None;
        }
        return Some(match tokens.iter().position(|t| *t == "--") {
            Some(i) => tokens[i + 1..].iter().map(|s| s.to_string()).collect(),
            None => Vec::new(),
        });
    }
    let at = tokens.iter().position(|t| t.ends_with("hylo-train"))?;
    (at == 0 || tokens[at - 1] != "-p")
        .then(|| tokens[at + 1..].iter().map(|s| s.to_string()).collect())
}

/// Stand-in files for `dataset` under `root` (made once per dataset).
fn stand_in(dataset: &str, root: &Path) -> PathBuf {
    let dir = root.join(format!("data-{dataset}"));
    if dir.exists() {
        return dir;
    }
    match dataset {
        "cifar10" => write_cifar10(&dir, 32).unwrap(),
        "lgg" => write_lgg(&dir, 5, 4, 32).unwrap(),
        "image-folder" => write_class_folder(&dir, 3, 12, 24).unwrap(),
        "mask-folder" => write_mask_folder(&dir, 40, 32).unwrap(),
        other => panic!("no stand-in for --dataset {other}: add one to this test"),
    }
    dir
}

/// The README's paths in a scratch folder: `runs/...`, `cmp.png`, the data placeholder `DIR`
/// (stand-in files of the line's dataset) and the repository's own data sets.
fn localise(args: &[String], scratch: &Path) -> Vec<String> {
    let dataset = args
        .windows(2)
        .find(|w| w[0] == "--dataset")
        .map(|w| w[1].clone());
    args.iter()
        .map(|a| {
            if a == "DIR" {
                let dataset = dataset.as_deref().expect("DIR with a --dataset");
                stand_in(dataset, scratch).display().to_string()
            } else if a.starts_with("runs/") || a.ends_with(".png") {
                scratch.join(a).display().to_string()
            } else if a.starts_with("datasets/") {
                repo().join(a).display().to_string()
            } else {
                a.clone()
            }
        })
        .collect()
}

#[test]
fn every_readme_command_parses_and_runs_on_stand_in_data() {
    let scratch = tempfile::tempdir().unwrap();
    let lines = shell_lines(&readme());
    let mut ran = Vec::new();
    for line in &lines {
        let Some(args) = hylo_train_args(line) else {
            continue;
        };
        let args = localise(&args, scratch.path());
        let cli = Cli::try_parse_from(std::iter::once("hylo-train".to_string()).chain(args))
            .unwrap_or_else(|e| panic!("README: `{line}` does not parse:\n{e}"));
        match cli.command {
            // The demo takes a minute and another backend may not be compiled in: parsed only.
            None | Some(Command::Demo(_)) | Some(Command::Flags) => {}
            Some(Command::Classify(mut cmd)) | Some(Command::Segment(mut cmd)) => {
                let command = if line.contains(" segment ") {
                    "segment"
                } else {
                    "classify"
                };
                if cmd.args.distributed || cmd.args.device != "cpu" {
                    // Needs MPI or a GPU backend compiled in: validated only.
                    cmd.args
                        .validate()
                        .unwrap_or_else(|e| panic!("`{line}`: {e}"));
                    continue;
                }
                // Two steps (four on a resume) at a size the tests can afford.
                cmd.args.max_steps = Some(if cmd.resume.is_some() { 4 } else { 2 });
                cmd.args.batch_size = cmd.args.batch_size.min(32);
                if command == "segment" {
                    cmd.args.image_size = Some(cmd.args.image_size.unwrap_or(32).min(32));
                    cmd.args.init_features = cmd.args.init_features.min(8);
                }
                let outcome =
                    run_training(command, cmd).unwrap_or_else(|e| panic!("`{line}`: {e}"));
                assert!(
                    outcome.final_val.0.is_finite() && outcome.state.global_step >= 2,
                    "`{line}`: {:?}",
                    outcome.final_val
                );
            }
            Some(Command::Info(i)) => {
                let text = info(&i).unwrap_or_else(|e| panic!("`{line}`: {e}"));
                assert!(text.contains("parameters"), "{text}");
            }
            Some(Command::Compare(c)) => {
                hylo_train::plot::compare(&c.runs, &c.out)
                    .unwrap_or_else(|e| panic!("`{line}`: {e}"));
                assert!(c.out.exists());
            }
        }
        ran.push(line.clone());
    }
    // The README shows training, the paper's runs, your own data, a resume, info and compare.
    for needle in [
        "--dataset cifar10",
        "--dataset lgg",
        "--dataset image-folder",
        "--dataset mask-folder",
        "--resume",
        " info ",
        " compare ",
    ] {
        assert!(
            ran.iter().any(|l| l.contains(needle)),
            "no README command with `{needle}` ran: {ran:#?}"
        );
    }
}

#[test]
fn the_papers_commands_run_the_papers_update() {
    // The defaults (grafting, the trust region, adaptive damping) are not the paper's update:
    // its commands must turn them off.
    let lines = shell_lines(&readme());
    let papers: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("--switch epochs:"))
        .collect();
    assert_eq!(papers.len(), 2, "{papers:#?}");
    for line in papers {
        for flag in ["--graft none", "--conv-mode spatial-mean", "--epochs "] {
            assert!(line.contains(flag), "`{line}` lacks {flag}");
        }
        let args = hylo_train_args(line).unwrap();
        let damping = args
            .windows(2)
            .find(|w| w[0] == "--damping")
            .map(|w| w[1].clone())
            .unwrap();
        assert!(damping.parse::<f64>().is_ok(), "a fixed damping: {damping}");
        // The switch's last epoch is reached or passed: the schedule means what it says.
        let epochs: u64 = args
            .windows(2)
            .find(|w| w[0] == "--epochs")
            .map(|w| w[1].parse().unwrap())
            .unwrap();
        let switch = args.windows(2).find(|w| w[0] == "--switch").unwrap()[1].clone();
        let first: u64 = switch
            .trim_start_matches("epochs:")
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            first < epochs,
            "`{line}`: KID until epoch {first} of {epochs}"
        );
    }
}

#[test]
fn the_flags_table_is_the_command_lines_own() {
    let text = readme();
    let begin = "<!-- flags:begin -->\n";
    let start = text.find(begin).expect("flags markers") + begin.len();
    let end = text.find("<!-- flags:end -->").expect("flags end marker");
    assert_eq!(
        &text[start..end],
        flags_markdown(),
        "README.md's flags table differs from `hylo-train flags`: paste its output between the \
         markers"
    );
}
