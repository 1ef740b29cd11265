#!/usr/bin/env bash
# The whole GPU measurement, in one run on the lent GPU machine (device tool; about 6 min on
# an H200). Prepare the wheels here first (bash tools/gpu_wheels.sh), then run there:
#
#   command: bash tools/gpu_measure.sh     carry: [".whl"]     timeout_s: 600
#
# Writes under $OUT (what the device tool brings back; default work_dirs/gpu):
#   fp32/benchmark.md + .png  ops, GPU kernel launches, kernel generation (all generators,
#                             per layer vs batched), one block, fold exactness on CUDA with
#                             TF32 off, and the ResNet-50 training step of every block type
#                             next to base (TF32 convolutions, PyTorch's default);
#   bf16/benchmark.md + .png  the training step again, forward under bfloat16 autocast;
#   run.log                   everything printed, with the device and versions.
# Commit what comes back under docs/benchmark/gpu/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-work_dirs/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L || true
python3 -c 'import torch, mmengine, mmcv, mmreparam; print("torch", torch.__version__,
"cuda", torch.version.cuda, "mmengine", mmengine.__version__, "mmcv", mmcv.__version__,
"mmreparam", mmreparam.__version__, torch.cuda.get_device_name(0))'
COMMON=(--device cuda --repeats 5 --rounds 1 --warmup 3)
python3 tools/benchmark.py "${COMMON[@]}" --only ops launches kernel block fold train \
  --out "$OUT/fp32"
python3 tools/benchmark.py "${COMMON[@]}" --only train --amp bf16 --out "$OUT/bf16"
