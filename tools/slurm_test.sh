#!/usr/bin/env bash
# Test on a Slurm cluster with the config's toolbox, like mmdet's tools/slurm_test.sh:
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS="..."] \
#     bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py arguments]
# (tools/slurm_run.sh says what the variables do).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: bash $0 PARTITION JOB_NAME CONFIG CHECKPOINT [test.py arguments]" >&2
  exit 2
fi
exec bash "$(dirname "$0")/slurm_run.sh" test.py "$1" "$2" "$3" "$4" --launcher="slurm" "${@:5}"
