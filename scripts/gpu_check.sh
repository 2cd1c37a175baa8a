#!/usr/bin/env bash
# GPU check: the GPU-marked tests and both benchmarks on one CUDA machine, within 9 minutes (the step limits
# add up to 540 s; on an H100 on 2026-11-27 the tests took about 150 s with a cold compile cache, bench_layer 20 s,
# bench_model 129 s).
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]     # default: $OUT/gpu_check if OUT is set, else outputs/gpu_check
#   bash scripts/gpu_check.sh --dry-run [DIR]   # CPU rehearsal: same steps, CPU device, --quick sizes
#
# It installs nothing from the network. The machine's python3 must already have torch (with CUDA), timm >= 1.0.31,
# numpy, pillow, pytest and pytest-timeout; run it from a copy of this repository (the package is used from the
# source tree through PYTHONPATH). If a package is missing or too old there, put its wheels in .whl/ at the
# repository root beforehand (e.g. `pip download --no-deps --only-binary=:all: timm==1.0.31 -d .whl`); they are
# installed offline into a temporary folder first.
#
# Every step has its own time limit and its output is appended to gpu_check.log; a failing or timed-out step is
# recorded in steps.tsv and the next step still runs; the exit code is non-zero if any step failed. Results:
# gpu_check.log, steps.tsv, bench_layer/ and bench_model/ (results.csv, summary.json, report.md each): 8 files.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${1:-}" ]]; then
    RESULTS="$1"
elif [[ -n "${OUT:-}" ]]; then
    RESULTS="$OUT/gpu_check"
else
    RESULTS="$REPO/outputs/gpu_check"
fi
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
LOG="$RESULTS/gpu_check.log"
STEPS="$RESULTS/steps.tsv"
PYTHON="${PYTHON:-python3}"
: >"$LOG"
printf 'step\texit_code\tseconds\n' >"$STEPS"
cd "$REPO"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
        .whl/*.whl >>"$LOG" 2>&1 || echo "wheel install failed (see above)" >>"$LOG"
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# run_step NAME SECONDS COMMAND...: run with a time limit, log its output, record its exit code; never abort.
run_step() {
    local name="$1" limit="$2"
    shift 2
    local start rc=0
    start=$(date +%s)
    {
        echo
        echo "=== $name (limit ${limit}s): $*"
    } >>"$LOG"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$STEPS"
    if [[ "$rc" == 124 || "$rc" == 137 ]]; then
        echo "=== $name: timed out after ${limit}s" >>"$LOG"
    fi
    return 0
}

if [[ "$DRY_RUN" == 1 ]]; then
    DEVICE=cpu
    QUICK=(--quick)
    LAYER_ARGS=()
    MODEL_ARGS=()
else
    DEVICE=cuda
    QUICK=()
    LAYER_ARGS=()
    # Compiling takes about a minute per model: the target case (small pair, training, 224 px) compiled, the
    # rest eager.
    MODEL_ARGS=(--compile-sizes 224 --compile-modes train --compile-pairs pace_vit_small_patch16_224)
fi

run_step environment 30 bash -c "date -u; uname -a; nvidia-smi || true; \"$PYTHON\" -c 'import torch, timm; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); \
print(\"gpu\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); print(\"timm\", timm.__version__)'"
run_step pytest_gpu 220 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    --timeout 180 tests
# ${A[@]+"${A[@]}"}: an empty array expands to nothing under `set -u` in every bash version.
run_step bench_layer 90 "$PYTHON" scripts/bench_layer.py --device "$DEVICE" ${QUICK[@]+"${QUICK[@]}"} \
    ${LAYER_ARGS[@]+"${LAYER_ARGS[@]}"} --out "$RESULTS/bench_layer"
run_step bench_model 200 "$PYTHON" scripts/bench_model.py --device "$DEVICE" ${QUICK[@]+"${QUICK[@]}"} \
    ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} --out "$RESULTS/bench_model"

echo "results in $RESULTS"
column -t "$STEPS" 2>/dev/null || cat "$STEPS"
# Non-zero when any step failed or timed out (its results and log are kept all the same).
awk -F'\t' 'NR > 1 && $2 != 0 { failed = 1 } END { exit failed }' "$STEPS"
