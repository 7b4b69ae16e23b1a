#!/usr/bin/env bash
# Install the recipe into a virtual environment (./.venv unless VENV is set), CPU-safe:
#   1. torch first (TORCH_SPEC, default the CPU wheel torch==2.13.0; TORCH_INDEX_URL to pick an index), so that
#      resolving the project's requirements never pulls a multi-GB CUDA build on a CPU host;
#   2. the project with its test extra, DeepSpeed built without prebuilt ops (DS_BUILD_OPS=0): the few ops we
#      touch are either unused on CPU or compiled on first use.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check -U pip 2>&1 | grep -v "^WARNING: Location" || true
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
  echo "[install] installing $TORCH_SPEC"
  "$PY" -m pip install -q "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "[install] installing the recipe (pip install -e .[test])"
DS_BUILD_OPS=0 "$PY" -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -c "import torch, deepspeed, recipe; print(f'[install] torch {torch.__version__}, deepspeed {deepspeed.__version__}')"
