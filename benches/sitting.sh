#!/usr/bin/env bash
# The sitting that produced benches/results/: a release build, then each study in turn with
# nothing else running (2 CPU cores here), then BENCHMARKS.md from the files. Timings compare
# only within one sitting. Run from anywhere; takes several hours on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p hylo-benches -p hylo-train
B=target/release/hylo-bench
R=benches/results
mkdir -p "$R"
$B --convergence --defaults-only --seeds 3 --json "$R/convergence.json"
$B --sweep --seeds 3 --json "$R/sweep.json"
$B --batch-study --seeds 1 --json "$R/batch.json"
$B --conv --json "$R/conv.json"
$B --json "$R/report.json" > "$R/report.md"
$B --markdown "$R" > BENCHMARKS.md
