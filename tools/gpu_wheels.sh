#!/usr/bin/env bash
# Gather, here, the pure-Python wheels that mmreparam needs on the lent GPU machine (whose
# image has torch, numpy, opencv, matplotlib, rich and pyyaml, but no OpenMMLab package):
# mmengine and its small dependencies, and mmcv-lite 2.1.0 (mmcv without its compiled ops;
# mmreparam uses mmcv.cnn only). Writes .whl/ (ignored by git), about 2 MB.
#
#   bash tools/gpu_wheels.sh        # then: device run 'bash tools/gpu_measure.sh', carry .whl
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash tools/bootstrap.sh  # .venv: pip and the build tools
PY=$ROOT/.venv/bin/python
rm -rf .whl.partial && mkdir .whl.partial
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d .whl.partial mmengine==0.10.7 mmcv-lite==2.1.0 addict==2.4.0 yapf==0.43.0 \
  termcolor==3.3.0 platformdirs==4.14.9
rm -rf .whl && mv .whl.partial .whl
ls -l .whl
