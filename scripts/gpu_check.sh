#!/usr/bin/env bash
# Issue 14 item 5: the CUDA paths, once, as one prepared script for a session that is lent a GPU
# (DEVELOPERS.md: 15 device minutes in all). Prepare here, then call the device with
#   carry: [".whl", ".data"]
#   command: bash .data/prelude.sh && bash scripts/gpu_check.sh
# after `bash ../shared/tools/device-prep.sh` (venv active). It prints, per run, the train
# stage's seconds per epoch (the first one holds the warm-up: CUDA context, cuDNN autotuning,
# lazy kernel loading, compilation), its total, top-1 and the benchmark stage's CUDA latency
# and peak memory; the summaries also land in $OUT/gpu_check.json to fetch.
#
# What it covers: bf16 autocast + channels_last (hardware=cuda), fp16 autocast with GradScaler,
# torch.compile, DDP with one rank on NCCL (torchrun), the benchmark stage on CUDA, and the
# airbench recipe's train-stage time, warm-up included, twice (two processes: nothing carries
# over but on-disk compile caches). The reference it must reach: airbench94's own script took
# 2.56 s per run there after a warm-up run (DEVELOPERS.md).
#
# Dry run of the plumbing on a CPU machine (tiny, seconds of training):
#   HW=cpu DATA=<imagefolder tree> SMALL="dataset.train_size=2048 train.epochs=1" \
#     OUT=/tmp/gpu_check bash scripts/gpu_check.sh
set -euo pipefail
export PYTHONPATH=${PYTHONPATH:-/tmp/site}
export EFFRUN_CACHE_DIR=${EFFRUN_CACHE_DIR:-/tmp/effcache}
DATA=${DATA:-/tmp/cifar10-jpeg}
HW=${HW:-cuda}
OUT=${OUT:-/tmp/gpu_check}
SMALL=${SMALL:-}
PY=${PY:-python3}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      'devices', torch.cuda.device_count())"

common=(+experiment=cifar10_airbench "dataset.root=$DATA" "hardware=$HW" cache.enabled=false
        "~hydra.callbacks.report")
# shellcheck disable=SC2206  # SMALL is a list of overrides, split on purpose
small=($SMALL)

effrun_run() {  # name, overrides...: one effrun process, then its summary line
    local name=$1; shift
    local start=$SECONDS
    if ! $PY -m effrun "${common[@]}" "${small[@]}" "$@" "hydra.run.dir=$OUT/$name" \
            > "$OUT/$name.log" 2>&1; then
        echo "== $name FAILED; its log's tail:"; tail -20 "$OUT/$name.log"; return 0
    fi
    echo "== $name ($((SECONDS - start)) s wall)"
    $PY scripts/gpu_summary.py "$OUT/$name" "$OUT/gpu_check.json"
}

effrun_run airbench_1                      # bf16 + channels_last, then the benchmark on CUDA
effrun_run airbench_2                      # a second process: is the warm-up paid again?
effrun_run fp16 hardware.precision=fp16 train.epochs=2 'stages=[train]'
effrun_run compiled hardware.compile=true train.epochs=2 'stages=[train]'

name=ddp_nccl_1rank                        # DDP through torchrun, one rank per GPU: NCCL
start=$SECONDS
if $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m effrun "${common[@]}" \
        "${small[@]}" train.epochs=2 'stages=[train]' hardware.sync_bn=true \
        "hydra.run.dir=$OUT/$name" > "$OUT/$name.log" 2>&1; then
    echo "== $name ($((SECONDS - start)) s wall)"
    $PY scripts/gpu_summary.py "$OUT/$name" "$OUT/gpu_check.json"
    grep -m1 -o "process group[^|]*" "$OUT/$name/effrun.log" || true
else
    echo "== $name FAILED; its log's tail:"; tail -20 "$OUT/$name.log"
fi
