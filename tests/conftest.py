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


def write_tiny_llama_gguf(path: Path, hidden: int = 16, layers: int = 2, ffn: int = 32, heads: int = 2,
                          kv_heads: int = 1, seed: int = 0) -> dict:
    """A tiny Llama as llama.cpp writes one (unquantized F32 tensors; a byte-level BPE tokenizer with
    SmolLM2's special tokens and two merges), written with the `gguf` package. Returns its tensors by
    GGUF name, as numpy arrays."""
    import gguf
    import numpy as np

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    byte_chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]  # GPT-2's byte map
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_chars, "th", "the"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # control tokens, then normal ones
    writer.add_token_merges(["t h", "th e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    rng = np.random.default_rng(seed)
    head = hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_q.weight": (hidden, hidden),
                   f"blk.{i}.attn_k.weight": (kv_heads * head, hidden), f"blk.{i}.attn_v.weight": (kv_heads * head, hidden),
                   f"blk.{i}.attn_output.weight": (hidden, hidden), f"blk.{i}.ffn_norm.weight": (hidden,),
                   f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, ffn)}
    tensors = {name: (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.1 * rng.standard_normal(shape))
               .astype(np.float32) for name, shape in shapes.items()}
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture(scope="session")
def tiny_smollm(tmp_path_factory) -> str:
    """A tiny Llama converted from a GGUF file as the bundled SmolLM2 is: its own byte-level
    tokenizer (a vocabulary unlike BERT's), pad token <|im_end|>."""
    from fedtune.bundled import convert_gguf

    folder = tmp_path_factory.mktemp("tiny-smollm")
    write_tiny_llama_gguf(folder / "tiny.gguf", layers=4)
    return str(convert_gguf(folder / "tiny.gguf", folder / "model"))


@pytest.fixture
def task_identity():
    """Flower Messages read run/task/node ids that a running app sets; set them for unit tests."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield TaskIdentity
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


# The export evaluator: one long-lived Python process that never imports fedtune, running
# scripts/evaluate_export.py once per request (a process start costs seconds; the check that
# fedtune stayed out of sys.modules runs after every request).
_EVALUATOR = r"""
import contextlib, io, json, os, runpy, sys, traceback
for line in sys.stdin:
    request = json.loads(line)
    os.chdir(request["cwd"])
    sys.argv, out = request["argv"], io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(sys.argv[0], run_name="__main__")
        assert not [m for m in sys.modules if m.split(".")[0] == "fedtune"], "fedtune was imported"
        reply = {"stdout": out.getvalue()}
    except BaseException:
        reply = {"error": traceback.format_exc()}
    sys.__stdout__.write(json.dumps(reply) + "\n")
    sys.__stdout__.flush()
"""


@pytest.fixture(scope="session")
def evaluate_export(tmp_path_factory):
    """Evaluate a run's model/ in a Python process that never imports fedtune, with plain
    transformers/peft (scripts/evaluate_export.py) and the hub offline; returns its metrics.
    With `extra_env`, in a fresh process of its own."""
    import json
    import subprocess
    import sys

    script = REPO / "scripts" / "evaluate_export.py"
    worker = None
    log = tmp_path_factory.mktemp("evaluator") / "stderr.log"

    def run(run_dir: Path, glue_dir: Path, extra_env: dict | None = None, base: str | None = None) -> dict:
        nonlocal worker
        config = json.loads((run_dir / "config.json").read_text())
        argv = [str(script), str(run_dir / "model"), "--task", config["task"], "--glue-dir", str(glue_dir),
                "--max-length", str(config["max-length"]), "--batch-size", str(config["eval-batch-size"]),
                "--limit", str(config["eval-limit"])] + (["--base", base] if base else [])
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(extra_env or {})}
        request = json.dumps({"cwd": str(run_dir.parent), "argv": argv}) + "\n"
        if extra_env:
            done = subprocess.run([sys.executable, "-c", _EVALUATOR], input=request, capture_output=True, text=True,
                                  env=env, timeout=300)
            reply = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            if worker is None or worker.poll() is not None:
                worker = subprocess.Popen([sys.executable, "-c", _EVALUATOR], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=log.open("a"), text=True, env=env)
            worker.stdin.write(request)
            worker.stdin.flush()
            reply = json.loads(worker.stdout.readline() or '{"error": "the evaluator died; see %s"}' % log)
        assert "error" not in reply, reply["error"][-3000:]
        return json.loads(reply["stdout"].strip().splitlines()[-1])

    yield run
    if worker is not None:
        worker.stdin.close()
        worker.wait(timeout=60)


@pytest.fixture
def interrupt_after_round(monkeypatch):
    """`interrupt_after_round(n)`: the next run stops as Ctrl-C would, right after its round-n
    checkpoint is written (later runs save normally)."""
    import fedtune.checkpoint as checkpoints

    real_save = checkpoints.save

    def arm(round_: int = 1) -> None:
        def save_then_die(folder, state, algorithm_state, records, *args):
            real_save(folder, state, algorithm_state, records, *args)
            if records[-1]["round"] == round_:
                monkeypatch.setattr(checkpoints, "save", real_save)
                raise KeyboardInterrupt

        monkeypatch.setattr(checkpoints, "save", save_then_die)

    return arm


@pytest.fixture
def resumed_run(interrupt_after_round):
    """`resumed_run(settings, n)`: run `settings` until right after round n's checkpoint (as Ctrl-C
    would stop it), then `fedtune resume` its `.incomplete` folder; the finished run's folder."""
    from fedtune.simulation import run_federated

    def run(settings, round_: int = 1) -> Path:
        before = set(Path(settings.out_dir).glob("*.incomplete"))
        interrupt_after_round(round_)
        with pytest.raises(KeyboardInterrupt):
            run_federated(settings, quiet=True)
        [interrupted] = set(Path(settings.out_dir).glob("*.incomplete")) - before
        return run_federated(settings.replace(resume=str(interrupted)), quiet=True)

    return run


def comparable_rounds(folder: Path, ignored: tuple[str, ...] = ("seconds", "elapsed")) -> list[dict]:
    """A run's `rounds.jsonl` without the entries whose names contain one of `ignored` (timings)."""
    from fedtune.runs import read_jsonl

    return [{k: v for k, v in r.items() if not any(word in k for word in ignored)}
            for r in read_jsonl(Path(folder) / "rounds.jsonl")]
