#!/usr/bin/env bash
# What tools/slurm_train.sh and tools/slurm_test.sh share (mmdet's slurm scripts):
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS="..."] \
#     bash tools/slurm_run.sh TOOL PARTITION JOB_NAME TOOL_ARGUMENTS... (with --launcher=slurm)
# srun starts GPUS tasks, GPUS_PER_NODE on each node, each one `tools/TOOL ... --launcher slurm`
# (mmengine's slurm launcher: one GPU per task). SRUN_ARGS is split into words for srun.
set -euo pipefail
TOOL=$1
PARTITION=$2
JOB_NAME=$3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-$HERE/../.venv/bin/python}
[ -x "$PY" ] || PY=python

set -x
# shellcheck disable=SC2086  # SRUN_ARGS: several srun options in one variable, as in mmdet
PYTHONPATH="$HERE/..:${PYTHONPATH:-}" \
srun -p "$PARTITION" \
    --job-name="$JOB_NAME" \
    --gres=gpu:"$GPUS_PER_NODE" \
    --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    $SRUN_ARGS \
    "$PY" -u "$HERE/$TOOL" "${@:4}"
