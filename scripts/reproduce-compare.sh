#!/usr/bin/env bash
# The method-comparison tables and plots in the README (preset small): every method on SST-2 and
# CoLA with IID clients ("easy case") and with Dirichlet alpha=0.1 clients ("hard case"), then the
# LoRA-rank sweep (Fed-LoRA vs Fed-LoRA-KD at r=4..32) on SST-2. Finished cells are reused, so an
# interrupted run resumes. Writes runs/compare/<task>-<partition>-small[-ranks]/{table.md,
# results.json,*.png} and the method x task tables runs/compare/{iid,dirichlet}-small.md.
set -euo pipefail
export GLUE_DIR=${GLUE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data/glue}
grid() { /usr/bin/time -f "$*: %e s" fedtune compare --quiet "$@"; }
grid --task sst2 --partition iid --seeds 2
grid --task sst2 --partition dirichlet --dirichlet-alpha 0.1 --seeds 2
grid --task cola --partition iid --seeds 2
grid --task cola --partition dirichlet --dirichlet-alpha 0.1 --seeds 2
grid --task sst2 --partition iid --seeds 2 --rank-sweep --methods "Fed-LoRA,Fed-LoRA-KD (server teacher)"
