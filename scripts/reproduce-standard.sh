#!/usr/bin/env bash
# The README's headline: the `standard` grids (every method at its tuned learning rate) on SST-2
# and CoLA, IID (2 seeds) and Dirichlet alpha=0.1 (1 seed). Finished cells and tuning trials are
# reused, so an interrupted run resumes (on either engine: the local one, used here, skips Ray and
# gives the same rounds). Then copies each grid's results.json and plots into
# docs/results/ and regenerates the README's tables from them (python -m fedtune.tables).
set -euo pipefail
cd "$(dirname "$0")/.."
export GLUE_DIR=${GLUE_DIR:-$(cd .. && pwd)/shared/data/glue} FLWR_TELEMETRY_ENABLED=0
FEDTUNE=${FEDTUNE:-.venv/bin/fedtune}
grid() {  # task partition seeds [flags]
  local task=$1 partition=$2 seeds=$3; shift 3
  /usr/bin/time -f "$task $partition: %e s" "$FEDTUNE" compare --quiet --preset standard --tune --engine local \
    --task "$task" --partition "$partition" --seeds "$seeds" "$@"
  local name="$task-$partition-standard" out=runs/compare/$task-$partition-standard
  cp "$out/results.json" "docs/results/$name.json"
  for plot in metric-vs-round metric-vs-mb; do cp "$out/$plot.png" "docs/results/$name-$plot.png"; done
}
grid sst2 iid 2
grid cola iid 2
grid sst2 dirichlet 1 --dirichlet-alpha 0.1
grid cola dirichlet 1 --dirichlet-alpha 0.1
.venv/bin/python -m fedtune.tables
