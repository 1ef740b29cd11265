#!/usr/bin/env bash
# Build the pinned OpenMMLab environment in .venv (idempotent).
#
#   bash tools/bootstrap.sh            # create / update .venv
#   PYTHON=python3.11 bash tools/bootstrap.sh
#
# Steps: venv -> build tools -> torch -> mmcv (built from its sdist, cached) -> OpenMMLab
# packages -> mmreparam (editable) + test and documentation tools. A stamp file records the
# hash of the inputs, so a second run returns within a second when nothing changed.
#
# Environment knobs:
#   PYTHON               interpreter for the venv (default: python3.11, else python3)
#   VENV                 venv path (default: .venv in the repository)
#   REQS                 the pinned stack (default: requirements/runtime.txt; the older stack
#                        most OpenMMLab users have: requirements/compat.txt, make test-compat)
#   EDITABLE             1 (default): mmreparam in editable mode, its C++ extension built into
#                        the source tree; 0: a regular install from a copy of the tree (a second
#                        venv on another torch must not overwrite that extension); redone
#                        whenever a file of the package changes
#   DOCS                 1 (default): also the documentation tools (requirements/docs.txt,
#                        `make docs`); 0: not (the second venv of make test-compat)
#   MMREPARAM_CACHE      where built mmcv wheels are kept (default: ~/.cache/mmreparam)
#   FORCE_CUDA=1         build mmcv with CUDA ops (default: only when torch sees a GPU)
#   MAX_JOBS             parallel compile jobs for mmcv (default: number of cores)
#   NEED_GIB             free disk space a complete venv needs, checked before anything is
#                        installed (default: 8; the pinned CUDA torch stack takes 6.4 GiB, the
#                        torch 2.1 one 5.6, plus pip's temporary files)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
REQS=${REQS:-$ROOT/requirements/runtime.txt}
EDITABLE=${EDITABLE:-1}
DOCS=${DOCS:-1}
CACHE=${MMREPARAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmreparam}
MMCV_VERSION=2.1.0
STAMP=$VENV/.mmreparam-bootstrap

step() { printf '\n[bootstrap] %s\n' "$*"; }
CURRENT_STEP=""
on_error() {
  printf '\n[bootstrap] FAILED during: %s\n' "$CURRENT_STEP" >&2
  printf '[bootstrap] fix the cause above, then run the same command again ' >&2
  printf '(finished steps are kept).\n' >&2
}
trap on_error ERR
run_step() { CURRENT_STEP=$1; step "$1"; }

if [ -z "${PYTHON:-}" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi

package_files() {  # what a regular (non-editable) install copies
  if [ "$EDITABLE" = 1 ]; then
    echo "$ROOT"/mmreparam/csrc/*
  else
    find "$ROOT/mmreparam" -type f \( -name '*.py' -o -name '*.cpp' \) | sort
  fi
}

docs_requirements() {  # the documentation tools, in the venv that builds the docs
  if [ "$DOCS" = 1 ]; then echo "$ROOT/requirements/docs.txt"; fi
}

inputs_hash() {
  # shellcheck disable=SC2046
  { echo "editable=$EDITABLE docs=$DOCS"; cat "$REQS" \
    "$ROOT"/requirements/{build,tests,deploy}.txt $(docs_requirements) \
    "$ROOT/setup.py" "$ROOT/tools/bootstrap.sh" $(package_files); } \
    | sha256sum | cut -c1-16
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(inputs_hash)" ] \
   && [ -x "$VENV/bin/python" ]; then
  exit 0  # environment is up to date
fi

# Disk space first: pip fails deep inside an install when the disk fills, and leaves a
# half-installed venv behind. What is already in the venv counts towards the need.
NEED_GIB=${NEED_GIB:-8}
case "$NEED_GIB" in
  ''|*[!0-9]*) echo "[bootstrap] NEED_GIB must be a whole number of GiB, not '$NEED_GIB'" >&2
               exit 1 ;;
esac
NEED_KIB=$(( NEED_GIB * 1024 * 1024 ))
HAVE_KIB=0
if [ -d "$VENV" ]; then HAVE_KIB=$(du -sk "$VENV" | cut -f1); fi
VENV_DISK=$(dirname "$VENV")  # the nearest existing directory: nothing is created to look
while [ ! -d "$VENV_DISK" ]; do VENV_DISK=$(dirname "$VENV_DISK"); done
FREE_KIB=$(df -Pk "$VENV_DISK" | awk 'NR == 2 {print $4}')
if [ $(( NEED_KIB - HAVE_KIB )) -gt "$FREE_KIB" ]; then
  printf '[bootstrap] not enough disk space for %s: a complete environment takes about %s GiB ' \
    "$VENV" "$NEED_GIB" >&2
  printf '(%s GiB of it there already), and its filesystem has %s GiB free.\n' \
    "$(( HAVE_KIB / 1048576 ))" "$(( FREE_KIB / 1048576 ))" >&2
  printf '[bootstrap] free some space, or set VENV to a directory on another disk.\n' >&2
  exit 1
fi

run_step "1/6 virtual environment at $VENV ($("$PYTHON" --version 2>&1))"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY=$VENV/bin/python
# pip, minus the machine-config noise about local index folders that do not hold a package.
pip_() {
  "$PY" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep --line-buffered -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
pip_ install -q --upgrade "pip>=24"

run_step "2/6 build tools (setuptools, wheel, ninja)"
pip_ install -q -r "$ROOT/requirements/build.txt"

run_step "3/6 torch and torchvision from $(basename "$REQS") (several GB; pip takes them from local disk when present)"
TORCH_PINS=$(grep -E '^(torch|torchvision|numpy)==' "$REQS")
# shellcheck disable=SC2086
pip_ install -q $TORCH_PINS

TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
if [ "${FORCE_CUDA:-0}" = 1 ] || "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  MMCV_FLAVOUR=cuda$("$PY" -c 'import torch; print(torch.version.cuda)')
  export FORCE_CUDA=1
else
  MMCV_FLAVOUR=cpu
fi
# The key includes the torch version: a wheel built against one torch must never be reused
# with another (C++ ABI of the ops).
MMCV_KEY="mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$MMCV_FLAVOUR-$PY_TAG-$(uname -m)"
MMCV_DIR=$CACHE/wheels/$MMCV_KEY

run_step "4/6 mmcv $MMCV_VERSION with ops ($MMCV_FLAVOUR, cache key $MMCV_KEY)"
if ls "$MMCV_DIR"/mmcv-*.whl >/dev/null 2>&1; then
  echo "using cached wheel $(ls "$MMCV_DIR"/mmcv-*.whl)"
else
  echo "no cached wheel: building mmcv from its sdist; on 2 CPU cores this takes about 13"
  echo "minutes on an idle machine and up to 35 with other work on it (started $(date +%H:%M))"
  BUILD=$(mktemp -d)
  # Metadata generation imports torch, hence no build isolation (torch is in the venv).
  pip_ download -q --no-deps --no-binary :all: --no-build-isolation \
    "mmcv==$MMCV_VERSION" -d "$BUILD"
  tar -xzf "$BUILD/mmcv-$MMCV_VERSION.tar.gz" -C "$BUILD"
  SRC=$BUILD/mmcv-$MMCV_VERSION
  # torch >= 2.14 headers need C++20; mmcv 2.1.0 hard-codes -std=c++14 / c++17 (right for
  # the older torch versions).
  if "$PY" -c 'import sys, torch; sys.exit(0 if tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 14) else 1)'; then
    sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$SRC/setup.py"
    grep -q -- '-std=c++20' "$SRC/setup.py"
  fi
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    pip_ wheel --no-deps --no-build-isolation -w "$BUILD/dist" "$SRC"
  mkdir -p "$CACHE/wheels"
  rm -rf "$MMCV_DIR.partial" && mkdir "$MMCV_DIR.partial"
  cp "$BUILD"/dist/mmcv-*.whl "$MMCV_DIR.partial/"
  mv "$MMCV_DIR.partial" "$MMCV_DIR"  # atomic: the cache never holds a half-written wheel
  rm -rf "$BUILD"
fi
MMCV_WHEEL=$(ls "$MMCV_DIR"/mmcv-*.whl)
if [ ! -f "$VENV/.mmcv-key" ] || [ "$(cat "$VENV/.mmcv-key")" != "$MMCV_KEY" ]; then
  # Same version number, different binary (another torch): replace it.
  pip_ install -q --force-reinstall --no-deps "$MMCV_WHEEL"
  echo "$MMCV_KEY" > "$VENV/.mmcv-key"
fi

run_step "5/6 OpenMMLab packages (mmengine, mmdet, mmsegmentation, mmpretrain)"
# One resolver call, so mmcv's and mmdet's dependencies are resolved against the pins together.
pip_ install -q "$MMCV_WHEEL" -r "$REQS"

if [ "$EDITABLE" = 1 ]; then HOW=editable; else HOW="installed from a copy"; fi
if [ "$DOCS" = 1 ]; then WITH_DOCS=", documentation tools"; else WITH_DOCS=""; fi
run_step "6/6 mmreparam ($HOW), test and ONNX export tools$WITH_DOCS"
# The stack's pins as constraints: a test, export or documentation tool must not move them
# (numpy < 2 on the torch 2.1 stack).
DOCS_REQS=()
if [ "$DOCS" = 1 ]; then DOCS_REQS=(-r "$ROOT/requirements/docs.txt"); fi
pip_ install -q -r "$ROOT/requirements/tests.txt" -r "$ROOT/requirements/deploy.txt" \
  ${DOCS_REQS[@]+"${DOCS_REQS[@]}"} -c "$REQS"
if [ "$EDITABLE" = 1 ]; then
  pip_ install -q --no-deps --no-build-isolation -e "$ROOT"
else
  # From a copy: an in-tree build would share build/ and the tree's extension with .venv.
  COPY=$(mktemp -d)
  tar -C "$ROOT" --exclude='./.venv*' --exclude='./build' --exclude='./work_dirs' \
    --exclude='./data' --exclude='./.git' --exclude='./.whl' --exclude='*.so' \
    --exclude='*.egg-info' -cf - . | tar -C "$COPY" -xf -
  pip_ install -q --no-deps --no-build-isolation --force-reinstall "$COPY"
  rm -rf "$COPY"
fi

CURRENT_STEP="import check"
cd /  # the installed package, not the source tree (which a non-editable install must not use)
"$PY" - <<'EOF'
import mmcv, mmcv.ops, mmdet, mmseg, mmpretrain, mmengine, torch
import mmreparam
print(f'[bootstrap] ok: torch {torch.__version__}, mmcv {mmcv.__version__} (ops), '
      f'mmengine {mmengine.__version__}, mmdet {mmdet.__version__}, '
      f'mmseg {mmseg.__version__}, mmpretrain {mmpretrain.__version__}')
EOF
inputs_hash > "$STAMP"
