#!/usr/bin/env bash
# The method-comparison tables and plots in the README (small preset, 2 seeds): every method on
# CoLA and SST-2 with IID clients ("easy case"), then Fed-LoRA vs Fed-LoRA-KD with Dirichlet
# alpha=0.1 clients ("hard case"). Finished cells are reused, so an interrupted run resumes.
# Writes runs/compare/<task>-<partition>-small/{table.md,results.json,*.png}.
set -euo pipefail
export GLUE_DIR=${GLUE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data/glue}
for task in sst2 cola; do
  /usr/bin/time -f "$task iid grid: %e s" fedtune compare --quiet --task "$task" --partition iid --seeds 2
done
for task in cola sst2; do
  /usr/bin/time -f "$task dirichlet grid: %e s" fedtune compare --quiet --task "$task" --partition dirichlet \
    --dirichlet-alpha 0.1 --seeds 2 --methods "Fed-LoRA,Fed-LoRA-KD (server teacher),Fed-LoRA-KD (client teachers)"
done
