"""Shared fixtures: tiny random models (saved like hub checkpoints) and the GLUE folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]


def _glue_dir() -> Path | None:
    for candidate in (os.environ.get("GLUE_DIR"), REPO.parent / "shared" / "data" / "glue"):
        if candidate and (Path(candidate) / "CoLA" / "train.tsv").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The real GLUE files (../shared/data/glue or $GLUE_DIR)."""
    path = _glue_dir()
    if path is None:
        pytest.skip("real GLUE data not found: set GLUE_DIR or place it at ../shared/data/glue")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir():
    from fedtune.models import resolve_model_path

    # The bundled tokenizer; tiny models share its vocabulary. The GPU check (no bundled package
    # there) points FEDTUNE_TEST_TOKENIZER at the model folder it carries.
    return os.environ.get("FEDTUNE_TEST_TOKENIZER") or resolve_model_path("minilm")


def _save_tiny(tmp_path_factory, name: str, config, tokenizer_dir) -> str:
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tokenizer_dir) -> str:
    from transformers import BertConfig

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    return _save_tiny(tmp_path_factory, "tiny-bert", config, tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_distilbert(tmp_path_factory, tokenizer_dir) -> str:
    from transformers import DistilBertConfig

    config = DistilBertConfig(vocab_size=30522, dim=32, n_layers=4, n_heads=2, hidden_dim=64,
                              max_position_embeddings=128)
    return _save_tiny(tmp_path_factory, "tiny-distilbert", config, tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> str:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    return _save_tiny(tmp_path_factory, "tiny-llama", config, tokenizer_dir)


@pytest.fixture
def task_identity():
    """Flower Messages read run/task/node ids that a running app sets; set them for unit tests."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield TaskIdentity
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="session")
def evaluate_export():
    """Evaluate a run's model/ in a fresh Python process that never imports fedtune, with plain
    transformers/peft (scripts/evaluate_export.py) and the hub offline; returns its metrics."""
    import json
    import subprocess
    import sys

    script = REPO / "scripts" / "evaluate_export.py"

    def run(run_dir: Path, glue_dir: Path, extra_env: dict | None = None, base: str | None = None) -> dict:
        config = json.loads((run_dir / "config.json").read_text())
        argv = [str(script), str(run_dir / "model"), "--task", config["task"], "--glue-dir", str(glue_dir),
                "--max-length", str(config["max-length"]), "--batch-size", str(config["eval-batch-size"]),
                "--limit", str(config["eval-limit"])] + (["--base", base] if base else [])
        code = (f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__'); "
                "assert not [m for m in sys.modules if m.split('.')[0] == 'fedtune'], 'fedtune was imported'")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(extra_env or {})}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              cwd=run_dir.parent, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run
