#!/usr/bin/env bash
# Distributed train with the config's toolbox, like mmdet's tools/dist_train.sh:
#   bash tools/dist_train.sh CONFIG NUM_PROCESSES [train.py arguments]
# On CPU (no GPU) torchrun starts NUM_PROCESSES gloo processes.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash $0 CONFIG NUM_PROCESSES [train.py arguments]" >&2
  exit 2
fi
exec bash "$(dirname "$0")/dist_run.sh" train.py "$2" "$1" "${@:3}"
