#!/usr/bin/env bash
# The sitting that produced benches/results/: a release build, then each study in turn with
# nothing else running (2 CPU cores here), then the README's defaults table and BENCHMARKS.md
# from the files. Timings compare only within one sitting. Run from the repository's root or
# anywhere; the three studies take about two hours on 2 cores, the timings below about 40 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p hylo-benches -p hylo-train
B=target/release/hylo-bench
R=benches/results
mkdir -p "$R"
$B --convergence --defaults-only --seeds 3 --json "$R/convergence.json"
$B --batch-study --seeds 1 --json "$R/batch.json"
$B --sweep --seeds 1 --json "$R/sweep.json"
# Timings: CPU convolutions, the curvature's scale per layer, whole steps beside PyTorch's (when a
# Python with torch is set up as benches/peer/README.md says), and the full report.
$B --conv --json "$R/conv.json" > /dev/null
$B --curvature-scale --json "$R/curvature_scale.json" > /dev/null && rm -f "$R/curvature_scale.csv"
TORCH_PYTHON=${TORCH_PYTHON:-$HOME/torch-venv/bin/python}
if [ -x "$TORCH_PYTHON" ]; then
  $B --peer-steps --torch-python "$TORCH_PYTHON" --json "$R/peer.json" > /dev/null
else
  $B --peer-steps --json "$R/peer.json" > /dev/null
fi
$B --json "$R/report.json" > "$R/report.md"
# Kernels per step on WGPU (lavapipe without a GPU; deterministic, CI's budget), in the default
# dev build, as CI builds it.
cargo build -p hylo-benches
target/debug/hylo-bench --kernels --quick --device wgpu --json "$R/kernels.json"
target/debug/hylo-bench --steps-only --device wgpu --step-batch 4 --json "$R/wgpu_steps.json" > /dev/null
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
