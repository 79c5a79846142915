#!/usr/bin/env bash
# docs/benchmarks.md: runs benchmarks/ (throughput, round overhead, aggregation,
# 1000 clients, compare grid), prints each table, saves benchmarks/results.json and rewrites the
# section. About 35 min on 2 cores; run it on an otherwise idle machine. Pass parts to run only
# those, e.g. `bash scripts/benchmark.sh --only throughput aggregation`.
set -euo pipefail
cd "$(dirname "$0")/.."
export GLUE_DIR=${GLUE_DIR:-$(cd .. && pwd)/shared/data/glue} FLWR_TELEMETRY_ENABLED=0
python -m benchmarks.run "$@"
