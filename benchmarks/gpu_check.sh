#!/usr/bin/env bash
# One GPU's figures for issue 20 in one JSON: SiT-XL/2 + REPA's training step (bf16, cached
# latents and features at 256 px, batch 32/64/128, eager and compiled, SDPA flash attention),
# the SDE sampler (250 steps, CFG 1.8 on [0, 0.7]) and the loader (8 workers). Sized for the
# issue's 8 minutes on one H200; not yet run on a GPU, so its time there is unmeasured.
# `--dry-run`: toy sizes, on the CPU when there is no GPU (the test suite runs it).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUTPUT.json]   (default benchmarks/results/gpu.json)
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=()
if [[ "${1:-}" == "--dry-run" ]]; then
    dry_run=(--dry-run)
    shift
fi
output="${1:-benchmarks/results/gpu.json}"
python -m repa.cli bench --device cuda "${dry_run[@]}" --output "$output"
