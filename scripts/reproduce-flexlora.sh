#!/usr/bin/env bash
# Heterogeneous LoRA ranks (README "FlexLoRA vs HetLoRA"): 4 clients with heavy-tail-light ranks
# from {4, 8, 16, 32} (two clients at 4, one at 8, one at 16), against FedLoRA with every client
# at the smallest (4) and at the largest (32) rank, on 4,000 private rows of each task (3 rounds,
# one local epoch each, lora-lr 3e-3). About 40 minutes on a 2-core CPU.
set -euo pipefail
export GLUE_DIR=${GLUE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data/glue}
OUT=${OUT:-runs/flexlora}
common=(--quiet --clients 4 --rounds 3 --local-epochs 1 --lora-lr 3e-3 --train-limit 4000 --rank-distribution heavy-tail-light
        --out-dir "$OUT")
for task in sst2 cola; do
  fedtune run "${common[@]}" --task "$task" --algorithm flexlora
  fedtune run "${common[@]}" --task "$task" --algorithm hetlora
  fedtune run "${common[@]}" --task "$task" --algorithm fedlora --lora-r 4
  fedtune run "${common[@]}" --task "$task" --algorithm fedlora --lora-r 32
done
fedtune report "$OUT"
