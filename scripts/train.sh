#!/usr/bin/env bash
# The main job: set up .venv, then fine-tune the embedded MiniLM on GLUE SST-2 with LoRA.
# Extra flags go to `lorakit train` (e.g. --num_epochs 1, --output_dir runs/x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA_DIR="${LORAKIT_DATA_DIR:-../shared/data}"
exec .venv/bin/lorakit train --config configs/sst2_minilm.yaml --data_dir "$DATA_DIR" "$@"
