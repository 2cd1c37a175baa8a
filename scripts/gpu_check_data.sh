#!/usr/bin/env bash
# GPU check of the device data path (data.decode=device), within 5 minutes on one CUDA machine:
#   1. the GPU data tests (nvJPEG decode + device augmentation against the CPU stage);
#   2. bench_data.py on >= 20k generated 500x375 q90 JPEGs in webdataset shards, <= 4 CPU workers: ready 224-px
#      training batches on the GPU per second (decode=device and decode=draft), and the data-wait share of a
#      PACE-ViT-S and a DeiT-S training step (bf16, AdamW, batch 256) fed by the device path.
#
#   bash scripts/gpu_check_data.sh [RESULTS_DIR]     # default: $OUT/gpu_check_data if OUT is set, else outputs/...
#   bash scripts/gpu_check_data.sh --dry-run [DIR]   # CPU rehearsal: same steps, CPU device, small sizes
#
# Installs nothing. Needs torch with CUDA, torchvision (decode_jpeg on CUDA), timm >= 1.0.31, pillow, webdataset,
# pytest. Results: gpu_check_data.log, steps.tsv, bench.json; the summary table is printed last.
# Environment: IMAGES (default 20480), BATCH (256), WORKERS (4), NSTEPS (30), COMPILE=1 to torch.compile the models.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${1:-${OUT:+$OUT/gpu_check_data}}"
RESULTS="${RESULTS:-$REPO/outputs/gpu_check_data}"
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
LOG="$RESULTS/gpu_check_data.log"
STEPS="$RESULTS/steps.tsv"
PYTHON="${PYTHON:-python3}"
: >"$LOG"
printf 'step\texit_code\tseconds\n' >"$STEPS"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
FAILED=0

run_step() {  # run_step NAME SECONDS COMMAND...: time-limited, logged, recorded; never aborts the script
    local name="$1" limit="$2"
    shift 2
    local start rc=0
    start=$(date +%s)
    printf '\n=== %s (limit %ss): %s\n' "$name" "$limit" "$*" >>"$LOG"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$STEPS"
    echo "$name: exit $rc after $(($(date +%s) - start)) s"
    [[ $rc -eq 0 ]] || FAILED=1
}

if [[ $DRY_RUN -eq 1 ]]; then
    DEVICE=cpu IMAGES="${IMAGES:-256}" BATCH="${BATCH:-32}" WORKERS="${WORKERS:-1}" NSTEPS="${NSTEPS:-2}" TEST_LIMIT=400
    SIZE=64 MODELS="pace_vit_test" TESTS=(tests/test_data_device.py -q -k "eval_equals or rejected")
else
    DEVICE=cuda IMAGES="${IMAGES:-20480}" BATCH="${BATCH:-256}" WORKERS="${WORKERS:-4}" NSTEPS="${NSTEPS:-30}" TEST_LIMIT=60
    SIZE=224 MODELS="pace_vit_small_patch16_224 deit_small_patch16_224" TESTS=(tests/test_data_device_gpu.py -q -m gpu)
fi
"$PYTHON" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'timm', timm.__version__, 'cuda', torch.cuda.is_available())" >>"$LOG" 2>&1 || true

run_step tests "$TEST_LIMIT" "$PYTHON" -m pytest -p no:cacheprovider "${TESTS[@]}"
# shellcheck disable=SC2086  # MODELS is a word list
run_step bench 200 "$PYTHON" scripts/bench_data.py --image-size 500x375 --num-images "$IMAGES" --gen-processes 12 \
    --input-size "$SIZE" --batch-size "$BATCH" --workers "$WORKERS" --repeats 1 --decode device draft \
    --device "$DEVICE" --no-baseline --step-model $MODELS --steps "$NSTEPS" ${COMPILE:+--compile} \
    --json "$RESULTS/bench.json"

"$PYTHON" - "$RESULTS/bench.json" <<'PY' || FAILED=1
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
print(f"{'measure':<58} {'value':>12}")
for row in rows:
    if "wait_share" in row:
        name = f"data-wait share, {row['model']}, decode={row['decode']}, {row['workers']} workers"
        print(f"{name:<58} {100 * row['wait_share']:>11.1f}%")
    else:
        name = f"ready batches, decode={row['decode']}, {row['workers']} workers (img/s)"
        print(f"{name:<58} {row['ours_total']:>12.0f}")
PY
exit $FAILED
