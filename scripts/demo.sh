#!/usr/bin/env bash
# Install (see scripts/install.sh), then run the whole job end to end on a built-in tiny model on CPU:
# tiny checkpoint -> prepare_ai2d.py -> hf_to_ds.py -> deepspeed train.py (PP=2 x DP=2, EP=2) -> ds_to_hf.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec "${VENV:-.venv}/bin/python" -m recipe.demo "$@"
