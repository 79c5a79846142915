#!/usr/bin/env bash
# A real Flower deployment on this machine: SuperLink + N SuperNodes on 127.0.0.1 over TLS with
# SuperNode authentication (development CA and keys made in <workdir>/certificates), then
# `flwr run` of this app; every process is stopped at the end. Writes under --workdir (default
# runs/deployment in the current folder); --help lists every option. Example:
#   bash scripts/deploy-local.sh --nodes 2 --run-config "rounds=2 train-limit=400"
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$ROOT/.venv/bin/python" ] || bash "$ROOT/scripts/setup.sh"
export GLUE_DIR=${GLUE_DIR:-$(cd "$ROOT/.." && pwd)/shared/data/glue}
exec "$ROOT/.venv/bin/python" -m fedtune.deployment "$@"
