#!/usr/bin/env bash
# One command: install, then run the tests (tiny random models + the real GLUE files).
# Default: the fast tier (pytest -m "not slow", under 2 minutes on 2 cores). FULL=1: every test
# (Ray simulations, SecAgg+, a TLS deployment, a real Ctrl-C, exports checked without fedtune);
# CI runs that. Tests run in parallel (pytest-xdist), one worker per CPU up to 4
# (TEST_WORKERS=N to choose; TEST_WORKERS=0 runs them in this process), torch's threads shared out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FLWR_TELEMETRY_ENABLED=0
cpus=$(.venv/bin/python -c "import os; print(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count())")
workers=${TEST_WORKERS:-$(( cpus < 4 ? cpus : 4 ))}
parallel=()
if [ "$workers" -gt 0 ]; then
  parallel=(-n "$workers")
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / workers > 0 ? cpus / workers : 1 ))}
fi
if [ "${FULL:-0}" = 1 ]; then
  .venv/bin/python -m pytest "${parallel[@]}" "$@"
else
  .venv/bin/python -m pytest "${parallel[@]}" -m "not slow" "$@"
fi
