#!/usr/bin/env bash
# The GPU measurements of docs/benchmark.md ("GPU" row) in one run, sized for one lent H100 / H200 (about 7 minutes,
# at most 10; each part has its own time limit so that one that hangs leaves the others their time):
#   1. v_jetmoe_tiny and c_jetmoe_femto against their dense twins, bf16 autocast, batch 256, inference and
#      training step, with training-step memory (fused AdamW and the lean Adafactor), and the SpheroMoE layer
#      against its matmul floor in float32 and in bf16 autocast;
#   1b. the bound: v_jetmoe_tiny with its MoE layers at their matmul floor, against the twin and the shipped model
#      (scripts/floor_bound.py, bf16 autocast, batch 256, inference and training step);
#   2. training-step memory (and speed) of v_jetmoe_small and c_jetmoe_tiny at the same settings (peaks of about 33
#      and 44 GiB estimated for the bf16 step: they fit an 80 GB H100);
#   3. timm's train.py under torchrun, one process per GPU, bf16, on a synthetic image folder. On a one-GPU machine
#      that is one process, which timm runs without DDP (WORLD_SIZE 1); DDP itself is tested on CPU (gloo) by
#      tests/test_train.py.
#
#   here, once:      JETMOE_TIMM_SCRIPTS=DIR bash scripts/device_check.sh prepare
#                    (wheels the device image lacks, and timm's train.py / validate.py, into .device/, ignored by git)
#   on the device:   bash scripts/device_check.sh run          (carry .device; results under $OUT)
#
# A smoke run on a CPU: DEVICE=cpu BATCH=2 BIG= IMAGES=8 EPOCHS=1 OUT=/tmp/dc bash scripts/device_check.sh run
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-256}
SMALL=${SMALL:-v_jetmoe_tiny c_jetmoe_femto}
BIG=${BIG-v_jetmoe_small c_jetmoe_tiny}
IMAGES=${IMAGES:-4096}  # synthetic training images for the torchrun run (8 classes)
EPOCHS=${EPOCHS:-2}
OUT=${OUT:-.device/out}
PY=${PYTHON:-python3}

prepare() {
    : "${JETMOE_TIMM_SCRIPTS:?set JETMOE_TIMM_SCRIPTS to the folder holding timm train.py and validate.py}"
    mkdir -p .device/wheels .device/timm_scripts
    cp "$JETMOE_TIMM_SCRIPTS/train.py" "$JETMOE_TIMM_SCRIPTS/validate.py" .device/timm_scripts/
    # the device image has torch, timm, safetensors, einops, huggingface_hub, but maybe another timm and no pymetis
    # (Python 3.12 there, no package index)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .device/wheels "timm==$("$PY" -c 'import timm; print(timm.__version__)')" pymetis
    ls .device/wheels .device/timm_scripts
}

run() {
    mkdir -p "$OUT"
    local log="$OUT/device_check.txt"
    exec > >(tee -a "$log") 2>&1
    date -u
    for wheel in .device/wheels/*.whl; do  # one by one: a wheel for another Python is skipped, not fatal
        [ -e "$wheel" ] && { "$PY" -m pip install -q --no-index --no-deps "$wheel" || echo "skipped $wheel"; }
    done
    # no index there: no build isolation; where the image cannot build an editable install, import from the tree
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # both big variants in one process: less fragmentation
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
    "$PY" -c 'import torch, timm, jetmoe_timm; print("torch", torch.__version__, "timm", timm.__version__)'

    local bench=("$PY" -m jetmoe_timm.tools.cli --debug bench --device "$DEVICE")
    timeout 150 "${bench[@]}" --models $SMALL --batch-sizes "$BATCH" --precisions bf16 \
        --compile off --layer-batch-sizes "$BATCH" --layer-precisions float32 bf16 --no-reference --rounds 5 \
        --out "$OUT/bench_small.json" \
        || echo "bench (small variants) failed: rc $?"
    timeout 120 "$PY" scripts/floor_bound.py --device "$DEVICE" --precision bf16 --batch-sizes "$BATCH" \
        --modes infer train --rounds 5 | tee "$OUT/floor_bound.txt" || echo "floor bound failed: rc $?"
    if [ -n "$BIG" ]; then
        timeout 120 "${bench[@]}" --models $BIG --batch-sizes "$BATCH" --precisions bf16 \
            --compile off --no-layer --rounds 3 --out "$OUT/bench_big.json" || echo "bench (big variants) failed: rc $?"
    fi

    local data; data=$(mktemp -d)
    "$PY" - "$data" "$IMAGES" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, n = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
for split, count in (('train', n), ('validation', max(8, n // 8))):
    for i in range(count):
        folder = root / split / f'class{i % 8}'
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f'{i}.png')
EOF
    local nproc=1 workers=8
    if [ "$DEVICE" != cpu ]; then nproc=$("$PY" -c 'import torch; print(torch.cuda.device_count())'); fi
    # loader workers pass batches through /dev/shm (about 40 MB each at batch 256): none where it is small
    if [ "$(df -k --output=avail /dev/shm 2>/dev/null | tail -1 || echo 0)" -lt 2000000 ]; then workers=0; fi
    df -h /dev/shm || true
    timeout 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m jetmoe_timm.train \
        --timm-scripts .device/timm_scripts "$data" --model v_jetmoe_tiny --num-classes 8 --device "$DEVICE" \
        -b "$BATCH" --amp --amp-dtype bfloat16 --opt adamw --lr 1e-3 --warmup-epochs 0 --epochs "$EPOCHS" -j "$workers" \
        --log-interval 4 --checkpoint-hist 1 --output "$data/runs" --experiment ddp || echo "torchrun train.py failed: rc $?"
    if [ -f "$data/runs/ddp/summary.csv" ]; then cp "$data/runs/ddp/summary.csv" "$OUT/train_summary.csv"; fi
    rm -rf "$data"
    date -u
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash scripts/device_check.sh prepare|run (see the comment at its top)" >&2; exit 2 ;;
esac
