#!/usr/bin/env bash
# Run one of the tools on NUM_PROCESSES processes with torchrun (--launcher pytorch):
#   bash tools/dist_run.sh TOOL NUM_PROCESSES [tool arguments]
# Used by dist_train.sh and dist_test.sh. On CPU (no GPU) the processes use gloo.
set -euo pipefail
TOOL=$1
NPROC=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-$HERE/../.venv/bin/python}
[ -x "$PY" ] || PY=python

PYTHONPATH="$HERE/..:${PYTHONPATH:-}" \
exec "$PY" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROC" --master_port="$PORT" \
    "$HERE/$TOOL" "${@:3}" --launcher pytorch
