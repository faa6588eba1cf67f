#!/usr/bin/env bash
# One script for a GPU machine (H100/H200 with torch, triton and transformers installed, no network,
# run as root from the repo root): build the package, run the GPU tests, run every bench in GPU mode,
# print one compact table last. Budget: under ~6 minutes.
#
#   bash bench/gpu_suite.sh            # results land in bench/results/ and $OUT (if set)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
LOG="$OUT/gpu_suite.log"
: > "$LOG"
status=0

step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2; shift 2
    echo "=== $name" | tee -a "$LOG"
    if timeout "$limit" "$@" >> "$LOG" 2>&1; then
        echo "    ok" | tee -a "$LOG"
    else
        echo "    FAILED ($?)" | tee -a "$LOG"; status=1
    fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
step "install" 240 python -m pip install --no-build-isolation --no-deps -e .
step "pytest -m gpu" 180 python -m pytest -m gpu -q -x
# Benches append their tables to $OUT/summary.txt via --summary.
: > "$OUT/summary.txt"
# --- bench steps (each issue adds its own line) ---
step "bench dwconv" 120 python bench/dwconv.py --device cuda --summary "$OUT/summary.txt"
step "bench decode" 120 python bench/decode.py --device cuda --summary "$OUT/summary.txt"
step "bench generate" 150 python bench/generate.py --device cuda --summary "$OUT/summary.txt"
step "bench retrieval" 150 python bench/retrieval.py --device cuda --summary "$OUT/summary.txt"
step "bench retrieval full" 240 python bench/retrieval.py --device cuda --full --summary "$OUT/summary.txt"
step "bench shards" 120 python bench/shards.py --device cuda --summary "$OUT/summary.txt"
# --- end bench steps ---

echo
echo "================ GPU suite summary ================"
cat "$OUT/summary.txt"
exit $status
