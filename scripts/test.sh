#!/usr/bin/env bash
# Install (see scripts/install.sh) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec "${VENV:-.venv}/bin/python" -m pytest -q "$@"
