#!/usr/bin/env bash
# The GPU suite, in one go, on a bare device machine: torch, triton and transformers installed, nothing
# else assumed (no PyAV, open_clip, DALI, faiss, pytest or pybind11), no network. Run from anywhere:
#
#   bash bench/make_wheelhouse.sh          # on a machine with network: wheelhouse/ (<= 60 MiB), carry it
#   bash bench/gpu_suite.sh                # on the GPU machine
#   SUITE_ONLY="pytest-kernels bench-train-step" bash bench/gpu_suite.sh   # a subset of steps
#   SUITE_DEVICE=cpu bash bench/gpu_suite.sh   # dry run without a GPU: the same steps on CPU, benches --quick
#
# Steps (each under STEP_LIMIT seconds, default 480 = 8 min): install the wheelhouse (if carried), build the
# native extension (if pybind11 is there), `rest-fast info`, the AOT compile check (no GPU needed), the CUDA
# kernel tests, every other `-m gpu` test, then every bench with --device cuda (the retrieval benches in the
# trainer's dtype, fp16 storage). A step whose requirement is missing (no CUDA device, a module that is not
# installed, a bench file another issue has not landed yet) is SKIPPED with the reason; a failing step is
# reported and the suite goes on. Last, one table: step, status, seconds, note; then the benches' tables.
# Exit code 1 when a step FAILED or TIMED OUT. Logs: $OUT (default bench/results/gpu_suite/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_suite}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
STEP_LIMIT=${STEP_LIMIT:-480}
LOG="$OUT/gpu_suite.log"
SUMMARY="$OUT/summary.txt"
ROWS="$OUT/steps.tsv"
: > "$LOG"; : > "$SUMMARY"; : > "$ROWS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PY OUT
# Optional modules: a step that dies on one of these missing is a skip (with the name), not a failure.
OPTIONAL_RE="av|open_clip|faiss|nvidia|nvidia\.dali|webdataset|pybind11|pytest|hypothesis|PIL|matplotlib|cv2|decord"

say() { echo "$*" | tee -a "$LOG"; }
row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$ROWS"; }
selected() { [ -z "${SUITE_ONLY:-}" ] || [[ " $SUITE_ONLY " == *" $1 "* ]]; }
skip() { selected "$1" || return 0; say "=== $1: SKIPPED ($2)"; row "$1" SKIPPED 0 "$2"; }
has_module() { "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$1') else 1)" 2>/dev/null; }
has_cuda() { "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

# step NAME LIMIT_S CMD... : run with a timeout, classify, record one row.
step() {
    local name=$1 limit=$2; shift 2
    selected "$name" || return 0
    local slog="$OUT/step-$name.log" t0 rc secs status note missing
    say "=== $name: $*"
    t0=$(date +%s)
    if [ "$(type -t "$1")" = function ]; then  # timeout runs programs: give a shell function its own bash
        timeout --kill-after=15 "$limit" bash -c "$(declare -f "$1"); $*" > "$slog" 2>&1
    else
        timeout --kill-after=15 "$limit" "$@" > "$slog" 2>&1
    fi
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    cat "$slog" >> "$LOG"
    missing=$(grep -oE "No module named '[A-Za-z0-9_.]+'" "$slog" | head -1 | sed -E "s/No module named '([^']+)'/\1/")
    if [ $rc -eq 0 ]; then
        status=ok; note=$(grep -E "passed|failed|skipped|launches" "$slog" | tail -1 | cut -c1-90)
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status=TIMEOUT; note="over ${limit} s"
    elif [ -n "$missing" ] && [[ "${missing%%.*}" =~ ^($OPTIONAL_RE)$ ]]; then
        status=SKIPPED; note="optional module '$missing' is not installed"
    else
        status=FAILED; note="exit $rc: $(grep -vE '^\s*$' "$slog" | tail -1 | cut -c1-80)"
    fi
    say "    $status ($secs s) $note"
    row "$name" "$status" "$secs" "$note"
}

# --- environment ---------------------------------------------------------------------------------------------
say "python: $PY ($("$PY" --version 2>&1))"
"$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)" 2>&1 | tee -a "$LOG"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
fi
CUDA=0; has_cuda && CUDA=1
NO_CUDA="no CUDA device (torch.cuda.is_available() is False)"
DEV=cuda
if [ "${SUITE_DEVICE:-cuda}" = cpu ]; then  # dry run of the machinery: GPU tests collect and skip, benches --quick
    CUDA=1; DEV=cpu
    say "SUITE_DEVICE=cpu: dry run on CPU (GPU tests skip themselves, benches run --quick)"
fi

# --- wheelhouse ---------------------------------------------------------------------------------------------
if [ -d wheelhouse ] && ls wheelhouse/*.whl > /dev/null 2>&1; then
    install_wheelhouse() {
        local ok="" bad="" w name
        for w in wheelhouse/*.whl; do
            name=$(basename "$w" | cut -d- -f1)
            if "$PY" -m pip install --no-index --find-links wheelhouse --disable-pip-version-check -q "$name" \
                    >> "$OUT/pip.log" 2>&1; then ok="$ok $name"; else bad="$bad $name"; fi
        done
        echo "installed:${ok:- none}"
        [ -z "$bad" ] || echo "not installable here (python/platform mismatch?):$bad"
        return 0
    }
    step wheelhouse 300 install_wheelhouse
else
    skip wheelhouse "no wheelhouse/ carried (bash bench/make_wheelhouse.sh builds it): optional parts are skipped"
fi

# --- build and info -----------------------------------------------------------------------------------------
if has_module pybind11; then
    step build-native 240 "$PY" setup.py build_ext --inplace -q
else
    skip build-native "pybind11 is not installed: the pure-Python caption cache serves"
fi
step info 120 "$PY" -m rest_fast info
# Compiles every kernel's representative launches for sm_90/sm_80 with this machine's triton (3.6 there):
# no GPU needed, so it also runs in a CPU-only simulation.
step aot-compile "$STEP_LIMIT" "$PY" bench/kernels_aot.py --quick --out "$OUT/kernels_aot.csv" --summary "$SUMMARY"

# --- GPU tests ----------------------------------------------------------------------------------------------
if [ $CUDA -eq 0 ]; then
    skip pytest-kernels "$NO_CUDA"
    skip pytest-gpu-all "$NO_CUDA"
elif ! has_module pytest; then
    skip pytest-kernels "pytest is not installed (carry the wheelhouse)"
    skip pytest-gpu-all "pytest is not installed (carry the wheelhouse)"
else
    # TRITON_INTERPRET=0: conftest defaults to the interpreter, under which CUDA tensors use the references.
    step pytest-kernels "$STEP_LIMIT" env TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_kernels_cuda.py
    # Every other gpu-marked test; files needing a missing optional module are reported, not fatal.
    gpu_all() {
        env TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider -m gpu --continue-on-collection-errors \
            --ignore tests/test_kernels_cuda.py tests/ > "$OUT/pytest-gpu-all.out" 2>&1
        local rc=$?
        cat "$OUT/pytest-gpu-all.out"
        local missing
        missing=$(grep -oE "No module named '[A-Za-z0-9_.]+'" "$OUT/pytest-gpu-all.out" | sort -u | tr '\n' ' ')
        [ -z "$missing" ] || echo "collection skipped files needing: $missing"
        # Collection errors alone (missing optional modules) are not failures; failed tests are.
        if [ $rc -ne 0 ] && ! grep -qE "[0-9]+ failed" "$OUT/pytest-gpu-all.out" && [ -n "$missing" ]; then
            return 0
        fi
        return $rc
    }
    step pytest-gpu-all "$STEP_LIMIT" gpu_all
fi

# --- benches (each appends its table to $SUMMARY) -----------------------------------------------------------
bench() {  # bench NAME FILE [ARGS...]
    local name=$1 file=$2; shift 2
    if [ ! -f "$file" ]; then skip "$name" "$file is not in this tree"; return; fi
    if [ $CUDA -eq 0 ]; then skip "$name" "$NO_CUDA"; return; fi
    local extra=()
    if [ "$DEV" = cpu ]; then
        if [[ " $* " == *" --full "* ]]; then skip "$name" "dry run on CPU: --full is GPU-sized"; return; fi
        grep -q '"--quick"' "$file" && extra=(--quick)
    fi
    step "$name" "$STEP_LIMIT" "$PY" "$file" --device "$DEV" --summary "$SUMMARY" "$@" "${extra[@]}"
}
bench bench-train-step bench/train_step.py
bench bench-dwconv bench/dwconv.py
bench bench-retrieval bench/retrieval.py
bench bench-retrieval-full bench/retrieval.py --full
bench bench-generate bench/generate.py
bench bench-decode bench/decode.py
bench bench-shards bench/shards.py
bench bench-loaders bench/loaders.py

# --- summary ------------------------------------------------------------------------------------------------
{
    echo
    echo "================================ GPU suite summary ================================"
    printf '%-22s %-8s %6s  %s\n' step status seconds note
    printf '%-22s %-8s %6s  %s\n' ---- ------ ------- ----
    while IFS=$'\t' read -r n s t note; do printf '%-22s %-8s %6s  %s\n' "$n" "$s" "$t" "$note"; done < "$ROWS"
    echo
    cat "$SUMMARY"
} | tee -a "$LOG"
if cut -f2 "$ROWS" | grep -qE '^(FAILED|TIMEOUT)$'; then exit 1; fi
exit 0
