#!/usr/bin/env bash
# The GPU suite, in one go, on a bare device machine: torch, triton and transformers installed, nothing else
# assumed, no network. Run from anywhere:
#
#   bash bench/make_wheelhouse.sh          # on a machine with network: wheelhouse/ (<= 60 MiB), carry it
#   bash bench/gpu_suite.sh --results DIR  # on the GPU machine (DIR default bench/results/gpu_suite)
#   SUITE_ONLY="pytest-kernels bench-train-step" bash bench/gpu_suite.sh   # a subset of the plan's steps
#   SUITE_PLAN=bench/gpu_suite_extra.plan bash bench/gpu_suite.sh          # another plan (the slower benches)
#   SUITE_DEVICE=cpu bash bench/gpu_suite.sh   # dry run without a GPU: the same plan on CPU, benches --quick
#
# The plan (bench/gpu_suite.plan; SUITE_PLAN replaces it, SUITE_EXTRA_STEPS appends a plan file) lists the
# steps in order, each with its cap in seconds and the requirements it declares. A step is SKIPPED only
# when one of ITS declared requirements, checked before it runs, is missing; a step that runs and exits
# non-zero is FAILED, one killed at its cap is TIMEOUT, and one left without time by SUITE_TOTAL_CAP
# (seconds for the whole run, default: none) is NOT-RUN. Every step runs strict (REST_FAST_STRICT=1: a
# fused op that would fall back to its reference raises) with the compiled kernels (TRITON_INTERPRET=0).
# As each step ends its row is appended to DIR/steps.tsv and DIR/summary.txt is rewritten (the table so
# far and the benches' tables, DIR/<step>.txt), so a run cut short keeps every finished row.
# Exit code 1 when a step FAILED, TIMED OUT or was NOT-RUN; 0 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-bench/results/gpu_suite}
while [ $# -gt 0 ]; do
    case $1 in
        --results) RESULTS=$2; shift 2 ;;
        --results=*) RESULTS=${1#--results=}; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
PLAN=${SUITE_PLAN:-bench/gpu_suite.plan}
for f in "$PLAN" ${SUITE_EXTRA_STEPS:-}; do
    [ -f "$f" ] || { echo "gpu_suite.sh: error: plan file $f does not exist" >&2; exit 2; }
done
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
PY=$("$PY" -c "import sys; print(sys.executable)")  # the interpreter itself, not a shim (pyenv) on every call
LOG="$RESULTS/gpu_suite.log"
ROWS="$RESULTS/steps.tsv"
SUMMARY="$RESULTS/summary.txt"
: > "$LOG"; : > "$ROWS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PY REST_FAST_STRICT=1 TRITON_INTERPRET=0
export REST_FAST_BENCH_RESULTS="$RESULTS"  # the benches' CSV rows go with the suite's results
SCALE=${SUITE_CAP_SCALE:-1}  # multiplies every cap (a slow CPU dry run); the plan's caps are the GPU's
T_START=$(date +%s)

say() { echo "$*" | tee -a "$LOG"; }
selected() { [ -z "${SUITE_ONLY:-}" ] || [[ " $SUITE_ONLY " == *" $1 "* ]]; }
has_module() { "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$1') else 1)" 2>/dev/null; }

write_summary() {  # the table so far, then every finished bench's table
    {
        echo "================================ GPU suite summary ================================"
        echo "$ENV_LINE"
        printf '%-22s %-8s %6s %6s  %s\n' step status seconds cap note
        printf '%-22s %-8s %6s %6s  %s\n' ---- ------ ------- --- ----
        while IFS=$'\t' read -r n s t c note; do printf '%-22s %-8s %6s %6s  %s\n' "$n" "$s" "$t" "$c" "$note"
        done < "$ROWS"
        echo "total: $(( $(date +%s) - T_START )) s"
        while IFS=$'\t' read -r n _; do
            [ -s "$RESULTS/$n.txt" ] && { echo; cat "$RESULTS/$n.txt"; }
        done < "$ROWS"
    } > "$SUMMARY"
}
row() {  # row NAME STATUS SECONDS CAP NOTE
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$ROWS"
    say "    $2 ($3 s of $4) $5"
    write_summary
}

# missing_requirement REQUIRES: prints the first declared requirement that is not met (nothing: all met).
missing_requirement() {
    local req
    IFS=',' read -ra reqs <<< "$1"
    for req in "${reqs[@]}"; do
        case $req in
            -|"") ;;
            cuda) [ "$CUDA" = 1 ] || { echo "$NO_CUDA"; return; } ;;
            module:*) has_module "${req#module:}" || { echo "module '${req#module:}' is not installed"; return; } ;;
            file:*) [ -e "${req#file:}" ] || { echo "${req#file:} does not exist"; return; } ;;
            *) echo "unknown requirement '$req' in the plan"; return ;;
        esac
    done
}

# run_step NAME CAP REQUIRES COMMAND: check the declared requirements, run under the cap, record one row.
run_step() {
    local name=$1 cap=$2 req=$3 cmd=$4 slog="$RESULTS/step-$1.log" missing limit left t0 rc secs note
    selected "$name" || return 0
    limit=$(( cap * SCALE ))  # the cap column of the table is this step's applied limit
    missing=$(missing_requirement "$req")
    if [[ "$missing" == "unknown requirement"* ]]; then row "$name" FAILED 0 "$limit" "$missing"; return; fi
    if [ -n "$missing" ]; then say "=== $name: SKIPPED"; row "$name" SKIPPED 0 "$limit" "$missing"; return; fi
    if [ -n "${SUITE_TOTAL_CAP:-}" ]; then
        left=$(( SUITE_TOTAL_CAP - ($(date +%s) - T_START) ))
        if [ "$left" -lt 1 ]; then row "$name" NOT-RUN 0 "$limit" "SUITE_TOTAL_CAP=${SUITE_TOTAL_CAP} s spent"; return; fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    : > "$RESULTS/$name.txt"
    say "=== $name (cap ${limit} s): $cmd"
    t0=$(date +%s)
    TABLE="$RESULTS/$name.txt" timeout --kill-after=10 "$limit" bash -c "$cmd" > "$slog" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    cat "$slog" >> "$LOG"
    if [ $rc -eq 0 ]; then
        note=$(grep -E "passed|failed|skipped|installed:" "$slog" | tail -1)
        [ -n "$note" ] || note=$(grep -vE '^\s*$' "$RESULTS/$name.txt" 2>/dev/null | tail -1)
        note=$(echo "$note" | cut -c1-100)
        row "$name" ok "$secs" "$limit" "$note"
    elif { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && [ "$secs" -ge $(( limit - 1 )) ]; then  # not an OOM kill
        row "$name" TIMEOUT "$secs" "$limit" "killed at its cap"
    else
        row "$name" FAILED "$secs" "$limit" "exit $rc: $(grep -vE '^\s*$' "$slog" | tail -1 | cut -c1-90)"
    fi
}

# --- environment ---------------------------------------------------------------------------------------------
say "python: $PY ($("$PY" --version 2>&1))"
ENV_LINE=$("$PY" -c "
import importlib.metadata as m, torch
v = lambda d: m.version(d) if __import__('importlib.util').util.find_spec(d) else 'MISSING'
print('torch', torch.__version__, '| triton', v('triton'), '| transformers', v('transformers'), '| cuda', torch.cuda.is_available())" 2>&1 | tail -1)
say "$ENV_LINE"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
fi
CUDA=0; [[ "$ENV_LINE" == *"| cuda True" ]] && CUDA=1
NO_CUDA="no CUDA device (torch.cuda.is_available() is False)"
export DEV=cuda QUICK=""
if [ "${SUITE_DEVICE:-cuda}" = cpu ]; then  # dry run of the plan: GPU tests collect and skip, benches --quick
    CUDA=1; DEV=cpu; QUICK=--quick
    say "SUITE_DEVICE=cpu: dry run of the plan on CPU (GPU tests skip themselves, benches run --quick)"
fi
say "plan: $PLAN${SUITE_EXTRA_STEPS:+ + $SUITE_EXTRA_STEPS}; results: $RESULTS"
write_summary
if ! has_module nvidia.dali; then
    say "DALI: nvidia-dali is not installed and cannot travel (its wheel is ~500 MB, far over the 60 MiB" \
        "wheelhouse): the DALI decoders are NOT measured on this machine"
    row dali SKIPPED 0 0 "nvidia-dali not installed, cannot travel (~500 MB wheel): DALI is NOT measured"
fi

# --- the plan -------------------------------------------------------------------------------------------------
# Read every step first (a step must not eat the plan from stdin), then run them in order.
mapfile -t STEPS < <(cat "$PLAN" ${SUITE_EXTRA_STEPS:-} | grep -vE '^\s*(#|$)')
for line in "${STEPS[@]}"; do
    read -r name cap req cmd <<< "$line"
    if ! [[ "$cap" =~ ^[0-9]+$ ]] || [ -z "$cmd" ]; then
        say "=== plan line not understood: $line"; row "${name:-?}" FAILED 0 "${cap:-?}" "plan line not understood"
        continue
    fi
    run_step "$name" "$cap" "$req" "$cmd" < /dev/null
done

cat "$SUMMARY" | tee -a "$LOG"
if cut -f2 "$ROWS" | grep -qE '^(FAILED|TIMEOUT|NOT-RUN)$'; then exit 1; fi
exit 0
