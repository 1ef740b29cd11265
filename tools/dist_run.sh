#!/usr/bin/env bash
# Run one of the tools on NUM_PROCESSES processes with torchrun (--launcher pytorch):
#   bash tools/dist_run.sh TOOL NUM_PROCESSES [tool arguments]
# Used by dist_train.sh and dist_test.sh. On CPU (no GPU) the processes use gloo.
# The tool's config (and checkpoint) are checked once before torchrun starts, so that a
# typo is one error line, not one per process and torchrun's traceback.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash $0 TOOL NUM_PROCESSES CONFIG [tool arguments]" >&2
  exit 2
fi
TOOL=$1
NPROC=$2
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "tools/$TOOL: error: NUM_PROCESSES must be a positive integer, got '$NPROC'" >&2
  exit 2
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-$HERE/../.venv/bin/python}
[ -x "$PY" ] || PY=python
export PYTHONPATH="$HERE/..:${PYTHONPATH:-}"

"$PY" -m mmreparam.cli.precheck "$TOOL" "${@:3}" || exit $?
exec "$PY" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROC" --master_port="$PORT" \
    "$HERE/$TOOL" "${@:3}" --launcher pytorch
