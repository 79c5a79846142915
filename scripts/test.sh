#!/usr/bin/env bash
# One command: install, then run the tests (tiny random models + the real GLUE files).
# Default: the fast tier (pytest -m "not slow", under 2 minutes on 2 cores). FULL=1: every test
# (Ray simulations, SecAgg+, a TLS deployment, a real Ctrl-C, exports checked without fedtune);
# CI runs that.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FLWR_TELEMETRY_ENABLED=0
if [ "${FULL:-0}" = 1 ]; then
  .venv/bin/python -m pytest "$@"
else
  .venv/bin/python -m pytest -m "not slow" "$@"
fi
