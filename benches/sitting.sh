#!/usr/bin/env bash
# The sitting that produced benches/results/: a release build, then each study in turn with
# nothing else running (2 CPU cores here), then the README's defaults table and BENCHMARKS.md
# from the files. Timings compare only within one sitting. Run from the repository's root or
# anywhere; the three studies take about two hours on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p hylo-benches -p hylo-train
B=target/release/hylo-bench
R=benches/results
mkdir -p "$R"
$B --convergence --defaults-only --seeds 3 --json "$R/convergence.json"
$B --batch-study --seeds 1 --json "$R/batch.json"
$B --sweep --seeds 1 --json "$R/sweep.json"
# Kernels per step on WGPU (lavapipe without a GPU; deterministic, CI's budget), as CI builds it.
cargo build -p hylo-benches --features wgpu
target/debug/hylo-bench --kernels --quick --device wgpu --json "$R/kernels.json"
# The README's defaults table, between its markers, and BENCHMARKS.md.
$B --readme-table "$R/convergence.json" > "$R/readme-table.md"
python3 - "$R/readme-table.md" <<'PY'
import sys
table = open(sys.argv[1]).read()
readme = open("README.md").read()
begin, end = "<!-- defaults:begin -->\n", "<!-- defaults:end -->"
start, stop = readme.index(begin) + len(begin), readme.index(end)
open("README.md", "w").write(readme[:start] + table + readme[stop:])
PY
rm "$R/readme-table.md"
$B --markdown "$R" > BENCHMARKS.md
