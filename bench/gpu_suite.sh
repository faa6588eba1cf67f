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
# The GPU box has no network: build in place against what is installed. If pybind11 is missing there, the
# package still imports from the source tree with the pure-Python caption cache.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step "build native extension" 240 python setup.py build_ext --inplace
python -c "import rest_fast.info as i; print(i.format_info(i.collect()))" 2>&1 | tee -a "$LOG"
# TRITON_INTERPRET=0: conftest would otherwise default to the interpreter, which also serves CUDA tensors.
step "pytest -m gpu" 180 env TRITON_INTERPRET=0 python -m pytest -m gpu -q
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
