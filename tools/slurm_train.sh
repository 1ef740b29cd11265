#!/usr/bin/env bash
# Train on a Slurm cluster with the config's toolbox, like mmdet's tools/slurm_train.sh:
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS="..."] \
#     bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py arguments]
# (tools/slurm_run.sh says what the variables do).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: bash $0 PARTITION JOB_NAME CONFIG WORK_DIR [train.py arguments]" >&2
  exit 2
fi
exec bash "$(dirname "$0")/slurm_run.sh" train.py "$1" "$2" "$3" --work-dir="$4" --launcher="slurm" "${@:5}"
