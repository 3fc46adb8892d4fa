#!/usr/bin/env bash
# The GPU code path on Mesa's lavapipe (a Vulkan driver that runs on the CPU; installed by
# .ci/run): the binaries with --device wgpu, the bench report and the kernel budget. The backend
# parity suite runs in `cargo test --workspace` (WGPU is a default feature), which .ci/run runs
# first with CI set, so that it fails instead of skipping without an adapter. Times here are
# CPU-emulated, not GPU figures.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/check-run.sh
# The parity suite's tests on one backend (train/tests/backend_parity.rs, module `wgpu`).
EXPECTED_PARITY_TESTS=5
export CI="${CI:-1}"
# Mesa wants a runtime directory; without one it prints an error on every start.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
vulkaninfo --summary 2>/dev/null | grep -E "deviceName|driverName" || true
# Seconds since the start, per stage, for CI's log.
stage() { echo "[wgpu-test ${SECONDS} s] $*" >&2; }

# A `cfg` or feature typo would leave zero tests in the default build, which passes: count them.
parity_tests=$(cargo test -p hylo-train --test backend_parity -- --list 2>/dev/null \
    | grep -c ': test$' || true)
if [ "$parity_tests" -ne "$EXPECTED_PARITY_TESTS" ]; then
    echo "backend_parity lists $parity_tests tests on wgpu, expected $EXPECTED_PARITY_TESTS" >&2
    exit 1
fi
# The default build (WGPU included) is the tests' build: this compiles nothing after them.
cargo build -p hylo-train -p hylo-benches
BIN=target/debug/hylo-train
OUT=$(mktemp -d)

stage demo
# 20 s per optimizer (the warm-up's first steps, which compile the kernels, are not counted).
timeout 900 "$BIN" demo --device wgpu --budget 20 --out "$OUT/demo" | tee "$OUT/demo.md"
test -s "$OUT/demo/demo.png"
# The demo prints its runs' summaries on stderr: its table on stdout (also the report's
# time-to-accuracy section) holds none.
if grep -q "^MaxSteps\|^TimeBudget" "$OUT/demo.md"; then
    echo "run summaries leaked into the demo's table" >&2
    exit 1
fi
# Every optimizer of the demo learned something: final accuracy well above chance (10 MNIST
# classes; 49-73% after 4-10 steps here, on a lavapipe shared with another job).
for optim in sgd kfac hylo; do
    acc=$(sed -n "s/^| $optim | \([0-9.]*\)% .*/\1/p" "$OUT/demo.md")
    above "$acc" 25 || { echo "demo on wgpu: $optim ended at '$acc'% accuracy" >&2; exit 1; }
done
# A short classify run on WGPU and the same on the CPU: finite, above chance (4 classes), and
# within 5 points of accuracy of each other.
stage classify
classify=(classify --optim hylo --freq 5 --max-steps 25 --train-samples 512 --val-samples 128)
timeout 600 "$BIN" "${classify[@]}" --device wgpu --out "$OUT/classify" | tee "$OUT/classify.txt"
grep -q "device wgpu: " "$OUT/classify/train.log"
timeout 600 "$BIN" "${classify[@]}" --device cpu --out "$OUT/classify-cpu" | tee "$OUT/classify-cpu.txt"
check_summary "$OUT/classify.txt" 0.25
check_summary "$OUT/classify-cpu.txt" 0.25
check_close "$(summary_metric "$OUT/classify.txt")" "$(summary_metric "$OUT/classify-cpu.txt")" 0.05
stage segment
timeout 900 "$BIN" segment --device wgpu --model unet --dataset shapes --optim kfac --freq 3 \
    --max-steps 16 --batch-size 8 --init-features 8 --train-samples 64 --val-samples 16 \
    --out "$OUT/segment" | tee "$OUT/segment.txt"
grep -q "stopped (MaxSteps) at epoch 2 step 16" "$OUT/segment/train.log"
# The same 16 steps on the CPU reached a validation Dice of 0.37-0.52 (seeds 0-2).
check_summary "$OUT/segment.txt" 0.2
stage report
# The report's ResNet-50 layers on the device (ResNet-32 steps and the time-to-accuracy run are
# left out: the kernel probes below run every optimizer's steps, and the demo above is that
# run). The layers with factors wider than 1200 (the 3x3 convolutions of 256 and 512 channels
# and the 2048-wide ones) took 10 of the report's minutes on lavapipe and test nothing the
# narrower ones do not.
timeout 1800 target/debug/hylo-bench --quick --device wgpu --layers-only --max-factor-dim 1200 \
    --json "$OUT/bench.json" > "$OUT/bench.md"
grep -q "not timed (\`--max-factor-dim\`)" "$OUT/bench.md"
grep -q "CPU-emulated" "$OUT/bench.md"
grep -q "Communication per refresh" "$OUT/bench.md"
grep -q "layers only" "$OUT/bench.md"
if grep -q "ResNet-32 training step\|Time to accuracy" "$OUT/bench.md"; then
    echo "--layers-only timed steps or ran the demo" >&2
    exit 1
fi
stage kernels
# Kernels launched per step (deterministic) and the bytes a step moves between host and device:
# none above the committed counts, and no byte in a step between refreshes (the budget's
# plain_bytes are 0 for every optimizer).
timeout 900 target/debug/hylo-bench --kernels --quick --device wgpu \
    --kernel-budget benches/results/kernels.json --json "$OUT/kernels.json" | tee "$OUT/kernels.md"
grep -q "| resnet20 | hylo |" "$OUT/kernels.md"
stage done
echo "wgpu tests passed"
