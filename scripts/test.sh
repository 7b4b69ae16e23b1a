#!/usr/bin/env bash
# Install (see scripts/install.sh), then check style (ruff) and the architecture contract (lint-imports, setup.cfg)
# and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
VENV=${VENV:-.venv}
echo "[test] ruff check"
"$VENV/bin/ruff" check -q .
echo "[test] lint-imports (the architecture contract in setup.cfg)"
"$VENV/bin/lint-imports" --no-cache
exec "$VENV/bin/python" -m pytest -q "$@"
