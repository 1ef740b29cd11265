#!/usr/bin/env bash
# Distributed test with the config's toolbox, like mmdet's tools/dist_test.sh:
#   bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCESSES [test.py arguments]
# On CPU (no GPU) torchrun starts NUM_PROCESSES gloo processes.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash $0 CONFIG CHECKPOINT NUM_PROCESSES [test.py arguments]" >&2
  exit 2
fi
exec bash "$(dirname "$0")/dist_run.sh" test.py "$3" "$1" "$2" "${@:4}"
