#!/usr/bin/env bash
# One command: install, then run the main job — FedLoRA on SST-2 with 4 simulated clients
# on the bundled all-MiniLM-L6-v2 (a short demo: 2,000 private rows, 3 rounds; with so few
# local steps LoRA needs a higher learning rate than the 1e-3 default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GLUE_DIR=${GLUE_DIR:-$(cd .. && pwd)/shared/data/glue} FLWR_TELEMETRY_ENABLED=0
.venv/bin/fedtune run --algorithm fedlora --task sst2 --clients 4 --rounds 3 --train-limit 2000 --lora-lr 3e-3 "$@"
