#!/usr/bin/env bash
# GPU check: numerics, the GPU-marked tests, the layer and model benchmarks and the profile on one CUDA machine,
# ending with a short table of the speed targets
# (scripts/bench_summary.py). Layer: PACE block vs timm softmax Block at 196 x 128, 4096 x 8, 16384 x 8, fused and
# separate paths. Models: PACE-ViT-S/T vs DeiT-S/T, 224 px, batch 128, bf16, eager, blocks compiled, and blocks
# compiled with CUDA graphs (reduce-overhead); inference too. Profile: GPU busy share and kernels per step.
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]     # default: /tmp/gpu_check if OUT is set, else outputs/gpu_check
#   bash scripts/gpu_check.sh --dry-run [DIR]   # CPU rehearsal: same steps, CPU device, --quick sizes
#   GPU_CHECK_STEPS=numerics,bench_layer bash scripts/gpu_check.sh   # only the named steps (default: all)
#   GPU_CHECK_STEPS=core bash scripts/gpu_check.sh  # the steps that fit one first call (limits add up to 535 s)
#   GPU_CHECK_PAIRS=pace_vit_small_patch16_224:deit_small_patch16_224 bash scripts/gpu_check.sh  # model pairs
#
# With OUT set (the device tool's folder, which brings back at most 8 files two folders deep), the results are
# written under /tmp/gpu_check and packed at the end into $OUT: gpu_check.tgz (everything), gpu_check.log,
# steps.tsv and summary.txt.
#
# It installs nothing from the network. The machine's python3 must already have torch (with CUDA), timm >= 1.0.31,
# numpy, pillow, pytest and pytest-timeout; run it from a copy of this repository (the package is used from the
# source tree through PYTHONPATH). If a package is missing or too old there, put its wheels in .whl/ at the
# repository root beforehand (e.g. `pip download --no-deps --only-binary=:all: timm==1.0.31 -d .whl`); they are
# installed offline into a temporary folder first.
#
# Every step has its own time limit and its output is appended to gpu_check.log; a failing or timed-out step is
# recorded in steps.tsv and the next step still runs; the exit code is non-zero if any step failed. Results:
# gpu_check.log, steps.tsv, summary.txt, bench_layer/, bench_model/, bench_model_graphs/ (results.csv, summary.json,
# report.md each), bench_kernels.json, profile_pace/ and profile_deit/ (profile.txt, summary.json each),
# count_eager/ and count_compiled/ (the op counter on the device), compile_time/ (count_ops.json each).
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
    RESULTS="/tmp/gpu_check"
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
CORE=environment,ceilings,numerics,bench_layer,bench_model_graphs,bench_kernels,profile_pace
if [[ "${GPU_CHECK_STEPS:-}" == core ]]; then
    GPU_CHECK_STEPS="$CORE"
fi
run_step() {
    local name="$1" limit=$(($2 * LIMIT_SCALE))
    shift 2
    if [[ -n "${GPU_CHECK_STEPS:-}" && ",$GPU_CHECK_STEPS," != *",$name,"* ]]; then
        return 0
    fi
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
    MODEL_ARGS=()  # --quick: pace_vit_test vs test_vit at 64 px
    PROFILE_PACE=(--model pace_vit_test --img-size 32 --batch 2 --steps 1 --warmup 1)
    PROFILE_DEIT=(--model test_vit --img-size 32 --batch 2 --steps 1 --warmup 1)
    PYTEST_ARGS=(tests/test_layers_mixer.py)  # the CPU twin of the numerics (float64 equality of both paths)
    # Inductor takes minutes per model on a small CPU: the rehearsal runs every step eagerly, with longer limits
    # (regional compilation itself is tested in tests/test_models_compile_blocks.py).
    COMPILED=(--compile eager)
    GRAPHS=(--compile eager)
    PROFILE_COMPILE=()
    COUNT_ARGS=(--dim 64 --heads 4 --rank 4 --tokens 64)
    COMPILED_BATCH=2
    COMPILE_MODEL=pace_vit_test
    LIMIT_SCALE=4
else
    DEVICE=cuda
    QUICK=()
    # PACE block vs timm softmax Block at 196 x 128, 4096 x 8, 16384 x 8; fused and separate PACE paths.
    LAYER_ARGS=(--scaling-tokens 196,4096,16384 --scaling-batch 128,8,8 --softmax-max-tokens 16384 --other-path
        --repeats 10 --warmup 3 --no-memory)
    # 224 px, batch 128, bf16, both pairs; blocks compiled regionally (one frame per block kind: seconds, not
    # the minute a whole-model compile takes).
    MODEL_ARGS=(--pairs "${GPU_CHECK_PAIRS:-pace_vit_small_patch16_224:deit_small_patch16_224,pace_vit_tiny_patch16_224:deit_tiny_patch16_224}"
        --sizes 224 --batch 128 --repeats 10 --warmup 3)
    PROFILE_PACE=(--model pace_vit_small_patch16_224 --batch 128 --steps 3 --warmup 3)
    PROFILE_DEIT=(--model deit_small_patch16_224 --batch 128 --steps 3 --warmup 3)
    # With the compiled block's gradients against eager's: torch 2.11's Dynamo once lost the fused mixer's gradient.
    TRACED=tests/test_kernels_gpu.py::test_traced_fused_block_on_cuda_matches_eager
    PYTEST_ARGS=(-m gpu tests/test_layers_mixer_gpu.py "$TRACED")
    COMPILED=(--compile eager,compiled --regional)
    GRAPHS=(--compile compiled --regional --compile-mode reduce-overhead)
    PROFILE_COMPILE=(--compile default --regional)
    COUNT_ARGS=()  # the S block at batch 128 (eager: extrapolated from small batches)
    COMPILED_BATCH=128
    COMPILE_MODEL=pace_vit_small_patch16_224
    LIMIT_SCALE=1
fi

# Step limits add up to 1045 s, more than one call may run (600 s): a first call on a fresh machine selects
# GPU_CHECK_STEPS=$CORE (limits 535 s; first measured 2026-12-04, docs/benchmarks.md), a second the rest (510 s).
run_step environment 30 bash -c "date -u; uname -a; nvidia-smi || true; \"$PYTHON\" -c 'import torch, timm; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); \
print(\"gpu\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); print(\"timm\", timm.__version__)'"
# The two ceilings (METHOD.md): device-to-device copy bandwidth and a large bf16 matrix product, on random data.
if [[ "$DRY_RUN" == 0 ]]; then
    run_step ceilings 20 "$PYTHON" -c "
import torch
x = torch.randn(2**30 // 2, device='cuda', dtype=torch.bfloat16); y = torch.empty_like(x)
a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16); b = torch.randn_like(a)
def ms(f, n=10):
    for _ in range(3): f()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(); s.record()
    for _ in range(n): f()
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / n
t = ms(lambda: y.copy_(x)); print(f'copy {2 * x.numel() * 2 / t / 1e6:.0f} GB/s (read + write, 1 GiB each)')
t = ms(lambda: a @ b); print(f'bf16 matmul {2 * 8192**3 / t / 1e9:.0f} TFLOP/s (8192^3, random)')
"
fi
# Numerics first (fused and separate paths against float64, 3 seeds, fp32 and bf16): its lines go to the log (-s).
run_step numerics 120 "$PYTHON" -m pytest -q -s -p no:cacheprovider --timeout 110 "${PYTEST_ARGS[@]}"
if [[ "$DRY_RUN" == 0 ]]; then
    run_step pytest_gpu 60 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
        --timeout 55 --deselect tests/test_layers_mixer_gpu.py --deselect "$TRACED" tests
fi
# ${A[@]+"${A[@]}"}: an empty array expands to nothing under `set -u` in every bash version.
run_step bench_layer 40 "$PYTHON" scripts/bench_layer.py --device "$DEVICE" ${QUICK[@]+"${QUICK[@]}"} \
    ${LAYER_ARGS[@]+"${LAYER_ARGS[@]}"} --out "$RESULTS/bench_layer"
# Training eager and compiled; then training and inference compiled with CUDA graphs (reduce-overhead).
run_step bench_model 120 "$PYTHON" scripts/bench_model.py --device "$DEVICE" ${QUICK[@]+"${QUICK[@]}"} \
    ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} --modes train "${COMPILED[@]}" --out "$RESULTS/bench_model"
run_step bench_model_graphs 150 "$PYTHON" scripts/bench_model.py --device "$DEVICE" ${QUICK[@]+"${QUICK[@]}"} \
    ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} --modes train,infer "${GRAPHS[@]}" --out "$RESULTS/bench_model_graphs"
# Triton kernels of pace.kernels against torch.linalg at the layers' sizes (interpreter smoke check when dry).
if [[ "$DRY_RUN" == 1 ]]; then
    run_step bench_kernels 20 "$PYTHON" scripts/bench_kernels.py --dry-run --out "$RESULTS/bench_kernels.json"
else
    run_step bench_kernels 90 "$PYTHON" scripts/bench_kernels.py --out "$RESULTS/bench_kernels.json"
fi
run_step profile_pace 90 "$PYTHON" scripts/profile_step.py --device "$DEVICE" "${PROFILE_PACE[@]}" \
    ${PROFILE_COMPILE[@]+"${PROFILE_COMPILE[@]}"} --out "$RESULTS/profile_pace"
run_step profile_deit 90 "$PYTHON" scripts/profile_step.py --device "$DEVICE" "${PROFILE_DEIT[@]}" \
    ${PROFILE_COMPILE[@]+"${PROFILE_COMPILE[@]}"} --out "$RESULTS/profile_deit"
# The counter on the device: the eager ops the CUDA path runs, and Inductor's own Triton schedule of a compiled
# block (the CPU proxy in docs/perf_notes.md, "Compiled-path count"); then compile_blocks' compile time.
run_step count_ops 90 bash -c "\"$PYTHON\" scripts/count_ops.py --device $DEVICE ${COUNT_ARGS[*]} \
    --out \"$RESULTS/count_eager\" && \"$PYTHON\" scripts/count_ops.py --device $DEVICE ${COUNT_ARGS[*]} \
    --batches $COMPILED_BATCH --target-batch $COMPILED_BATCH --compiled triton --out \"$RESULTS/count_compiled\""
run_step compile_time 150 "$PYTHON" scripts/count_ops.py --device "$DEVICE" --no-blocks \
    --compile-time "${COMPILE_MODEL}" --out "$RESULTS/compile_time"

echo "results in $RESULTS"
column -t "$STEPS" 2>/dev/null || cat "$STEPS"
echo
"$PYTHON" scripts/bench_summary.py "$RESULTS" 2>&1 | tee "$RESULTS/summary.txt" || true
if [[ -n "${OUT:-}" && "$RESULTS" != "$OUT"* ]]; then
    tar -czf "$OUT/gpu_check.tgz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" || true
    cp "$LOG" "$STEPS" "$RESULTS/summary.txt" "$OUT/" || true
fi
# Non-zero when any step failed or timed out (its results and log are kept all the same).
awk -F'\t' 'NR > 1 && $2 != 0 { failed = 1 } END { exit failed }' "$STEPS"
