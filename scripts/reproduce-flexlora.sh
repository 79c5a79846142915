#!/usr/bin/env bash
# Heterogeneous LoRA ranks (README "FlexLoRA vs HetLoRA"): 4 clients with heavy-tail-light ranks
# from {4, 8, 16, 32} (two clients at 4, one at 8, one at 16), against FedLoRA with every client
# at the smallest (4) and at the largest (32) rank. About 20 minutes on a 2-core CPU.
set -euo pipefail
export GLUE_DIR=${GLUE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data/glue}
OUT=${OUT:-runs/flexlora}
common=(--quiet --clients 4 --rounds 4 --local-epochs 0.5 --rank-distribution heavy-tail-light --out-dir "$OUT")
for task in sst2 cola; do
  limit=(); [ "$task" = sst2 ] && limit=(--train-limit 8000)
  fedtune run "${common[@]}" "${limit[@]}" --task "$task" --algorithm flexlora
  fedtune run "${common[@]}" "${limit[@]}" --task "$task" --algorithm hetlora
  fedtune run "${common[@]}" "${limit[@]}" --task "$task" --algorithm fedlora --lora-r 4
  fedtune run "${common[@]}" "${limit[@]}" --task "$task" --algorithm fedlora --lora-r 32
done
fedtune report "$OUT"
