#!/usr/bin/env bash
# Install (see scripts/install.sh), then run the whole job end to end on a built-in tiny model on CPU:
# tiny checkpoint -> prepare_ai2d.py (with a held-out split) -> hf_to_ds.py -> recipe.evaluate -> deepspeed train.py
# (PP=2 x DP=2, EP=2, validating on the held-out split) -> ds_to_hf.py -> recipe.evaluate: held-out loss and ai2d
# accuracy before and after fine-tuning.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec "${VENV:-.venv}/bin/python" -m recipe.demo "$@"
