#!/usr/bin/env bash
# Reproduces the numbers in the README's "Baselines" and "Federated" sections.
# Needs GLUE_DIR (or ../shared/data/glue). About 110 minutes on a 2-core CPU.
set -euo pipefail
export GLUE_DIR=${GLUE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data/glue}
OUT=${OUT:-runs/reproduce}

# Centralized baselines at an equal budget per task (SST-2: 0.3 epoch of the private rows; CoLA: 1 epoch).
for method in lora finetune kd; do
  fedtune centralized --quiet --method "$method" --task sst2 --epochs 0.3 --out-dir "$OUT"
  fedtune centralized --quiet --method "$method" --task cola --epochs 1 --out-dir "$OUT"
done

# The full-epoch LoRA run of the "Done when" (>= 0.85 on SST-2), and FedLoRA at the same budget:
# 4 clients x 4 rounds x 0.25 local epochs = one pass over the same private rows.
fedtune centralized --quiet --method lora --task sst2 --epochs 1 --out-dir "$OUT"
fedtune run --quiet --algorithm fedlora --task sst2 --clients 4 --rounds 4 --local-epochs 0.25 --out-dir "$OUT"
fedtune run --quiet --algorithm fedlora --task sst2 --clients 4 --rounds 4 --local-epochs 0.25 --lora-lr 3e-3 \
  --out-dir "$OUT"

# Bytes per round of FedAvg with the default model on SST-2 (one local step: only the bytes matter).
fedtune run --quiet --algorithm fedavg --task sst2 --clients 4 --rounds 1 --local-steps 1 --out-dir "$OUT"

fedtune report "$OUT"
