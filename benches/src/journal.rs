//! A journal of finished runs beside a study's JSON (one JSON line a run), so that a sitting
//! that is interrupted keeps what it measured and `--resume` carries on from it instead of
//! starting again.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::convergence::{RunResult, Setting};

/// The finished runs of a study, read from and appended to a JSON-lines file.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    done: Vec<RunResult>,
}

impl Journal {
    /// The journal of the study whose JSON goes to `json` (`<json>.runs.jsonl`).
    pub fn path_for(json: &Path) -> PathBuf {
        let mut name = json.as_os_str().to_owned();
        name.push(".runs.jsonl");
        PathBuf::from(name)
    }

    /// Opens the journal at `path`: with `resume`, the runs it holds are reused; without, it
    /// starts empty (an old file is replaced). A line that does not parse is an error naming
    /// the file and the line.
    pub fn open(path: PathBuf, resume: bool) -> Result<Self, String> {
        let mut done = Vec::new();
        if resume && path.exists() {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let run: RunResult = serde_json::from_str(line).map_err(|e| {
                    format!(
                        "{} line {}: expected a finished run (JSON), {e}",
                        path.display(),
                        i + 1
                    )
                })?;
                done.push(run);
            }
        } else {
            std::fs::write(&path, "").map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(Self { path, done })
    }

    /// Runs already in the journal.
    pub fn len(&self) -> usize {
        self.done.len()
    }

    /// Whether the journal holds no run.
    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    /// The journaled run of `task` with `optimizer`, `setting` and `seed`, if there is one.
    pub fn find(
        &self,
        task: &str,
        optimizer: &str,
        setting: &Setting,
        seed: u64,
    ) -> Option<&RunResult> {
        self.done.iter().find(|r| {
            r.task == task && r.optimizer == optimizer && &r.setting == setting && r.seed == seed
        })
    }

    /// Appends a finished run (written at once, so that an interruption keeps it).
    pub fn record(&mut self, run: &RunResult) -> Result<(), String> {
        let line = serde_json::to_string(run).map_err(|e| e.to_string())?;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        writeln!(file, "{line}").map_err(|e| format!("{}: {e}", self.path.display()))?;
        self.done.push(run.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(task: &str, seed: u64, last: f64) -> RunResult {
        let line = serde_json::json!({
            "task": task, "optimizer": "hylo",
            "setting": {"lr": null, "damping": null, "momentum": null},
            "seed": seed, "last": last, "last_epoch_mean": last, "best": last,
            "steps_to_target": null, "time_to_target": null, "diverged": false,
            "loss_rises": 0, "train_losses": [], "error": null, "dampings": [],
            "metrics": [], "wall_s": 1.0
        });
        serde_json::from_value(line).expect("a run")
    }

    #[test]
    fn finished_runs_are_kept_and_found_again_only_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = Journal::path_for(&dir.path().join("convergence.json"));
        assert!(path.ends_with("convergence.json.runs.jsonl"));
        let defaults = run("mlp", 0, 0.5).setting;
        let mut journal = Journal::open(path.clone(), false).unwrap();
        journal.record(&run("mlp", 0, 0.5)).unwrap();
        journal.record(&run("mlp", 1, 0.6)).unwrap();
        // An interrupted sitting resumed: both runs are there, matched on task, optimizer,
        // setting and seed.
        let resumed = Journal::open(path.clone(), true).unwrap();
        assert_eq!(resumed.len(), 2);
        assert_eq!(resumed.find("mlp", "hylo", &defaults, 1).unwrap().last, 0.6);
        assert!(resumed.find("mlp", "hylo", &defaults, 2).is_none());
        assert!(resumed.find("mlp", "sgd", &defaults, 0).is_none());
        assert!(resumed.find("unet", "hylo", &defaults, 0).is_none());
        let other = Setting {
            lr: Some(0.3),
            ..defaults.clone()
        };
        assert!(resumed.find("mlp", "hylo", &other, 0).is_none());
        // Without --resume the journal starts again.
        assert!(Journal::open(path.clone(), false).unwrap().is_empty());
        assert!(Journal::open(path.clone(), true).unwrap().is_empty());
        // A damaged line is named.
        std::fs::write(&path, "{\"task\": \"mlp\"\n").unwrap();
        let err = Journal::open(path.clone(), true).unwrap_err();
        assert!(
            err.contains("line 1") && err.contains("runs.jsonl"),
            "{err}"
        );
    }
}
