#!/usr/bin/env bash
# A real Flower deployment on this machine: SuperLink + N SuperNodes on 127.0.0.1 over TLS with
# SuperNode authentication (development CA and keys made in runs/deployment/certificates), then
# `flwr run` of this app; every process is stopped at the end. Example:
#   bash scripts/deploy-local.sh --nodes 2 --run-config "rounds=2 train-limit=400"
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export GLUE_DIR=${GLUE_DIR:-$(cd .. && pwd)/shared/data/glue}
exec .venv/bin/python -m fedtune.deployment "$@"
