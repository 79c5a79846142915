#!/usr/bin/env bash
# One command: install, then run the test suite (tiny random models + the real GLUE files).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FLWR_TELEMETRY_ENABLED=0
.venv/bin/python -m pytest "$@"
