#!/usr/bin/env bash
# The GPU check, for a bare machine with one CUDA GPU, Python, torch, transformers and peft but no
# network (no flwr, datasets or bundled model): about 9 minutes on an H200 (benchmarks/gpu.py says what it runs).
#
#   bash scripts/gpu-check.sh pack   # here, with the venv: fills .gpu/ (wheels, the model in fp16, GLUE)
#   bash scripts/gpu-check.sh run    # there, in the repository root, with .gpu/ copied along
#
# .gpu/ is about 60 MB and git-ignored; GLUE files are copied only into it, never into the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
pack)
  glue=${GLUE_DIR:-$(cd .. && pwd)/shared/data/glue}
  [ -f "$glue/SST-2/train.tsv" ] || { echo "no GLUE files at $glue: set GLUE_DIR" >&2; exit 2; }
  rm -rf .gpu && mkdir -p .gpu/whl .gpu/glue/SST-2 .gpu/glue/CoLA
  # What the GPU image lacks (it has torch, transformers, peft, numpy, pyarrow, grpcio, protobuf,
  # rich, typer, ...), at the versions pinned here; --no-deps: each one is named.
  names="flwr flwr[-_]datasets datasets dill multiprocess iterators tomli[-_]w pycryptodome cryptography cffi pycparser"
  pins=$(.venv/bin/python -m pip freeze | grep -iE "^($(echo "$names" | sed 's/ /|/g'))==" )
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 -d .gpu/whl $pins
  .venv/bin/python - <<'PY'
import torch
from transformers import AutoModel
from fedtune.models import load_tokenizer, resolve_model_path
path = resolve_model_path("minilm")
AutoModel.from_pretrained(path, dtype=torch.float16).save_pretrained(".gpu/minilm-fp16")  # fedtune loads it as fp32
load_tokenizer("minilm").save_pretrained(".gpu/minilm-fp16")
PY
  for task in SST-2 CoLA; do cp "$glue/$task/train.tsv" "$glue/$task/dev.tsv" ".gpu/glue/$task/"; done
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  size=$(du -sb .gpu | cut -f1)
  echo "packed .gpu/: $((size / 1000000)) MB (the code travels with it: keep the total under 64 MiB)"
  ;;
run)
  [ -d .gpu/whl ] || { echo "no .gpu/ here: run 'bash scripts/gpu-check.sh pack' first and copy it along" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD FLWR_TELEMETRY_ENABLED=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, transformers, peft, flwr; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'flwr', flwr.__version__)"
  export FEDTUNE_TEST_TOKENIZER=$PWD/.gpu/minilm-fp16 GLUE_DIR=$PWD/.gpu/glue
  python3 -m benchmarks.gpu --glue-dir .gpu/glue --model "$PWD/.gpu/minilm-fp16" "${@:2}"
  ;;
*)
  echo "usage: bash scripts/gpu-check.sh pack | run [--skip-run]" >&2; exit 2 ;;
esac
