"""Bundled models: the GGUF -> safetensors conversion SmolLM2 goes through, and name resolution."""

import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from fedtune.bundled import MODELS, bundled_name, convert_gguf
from fedtune.inputs import model_folder_problem
from tests.conftest import write_tiny_llama_gguf


def test_conversion_keeps_the_gguf_tensors_and_tokenizer(tmp_path):
    written = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    folder = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    # GGUF stores each matrix as transformers does (out, in); only q/k rows are permuted for RoPE.
    assert np.array_equal(weights["model.embed_tokens.weight"].numpy(), written["token_embd.weight"])
    assert np.array_equal(weights["model.layers.1.self_attn.v_proj.weight"].numpy(), written["blk.1.attn_v.weight"])
    assert np.array_equal(weights["model.layers.0.mlp.down_proj.weight"].numpy(), written["blk.0.ffn_down.weight"])
    assert np.array_equal(weights["model.norm.weight"].numpy(), written["output_norm.weight"])
    assert all(t.dtype.is_floating_point and t.dtype.itemsize == 4 for t in weights.values())
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2 and config["hidden_size"] == 16
    assert "quantization_config" not in config  # plain fp32 weights now

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    ids = tokenizer("the").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["the"]  # both merges applied


def test_a_finished_folder_is_reused_and_nothing_partial_is_left(tmp_path):
    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    folder = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "model")
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    (tmp_path / "tiny.gguf").unlink()  # a second call must not read it again
    assert convert_gguf(tmp_path / "tiny.gguf", tmp_path / "model") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _convert(args):
    gguf_file, folder = args
    out = convert_gguf(Path(gguf_file), Path(folder))
    return sorted(p.name for p in out.iterdir())


def test_concurrent_first_uses_both_get_one_complete_folder(tmp_path):
    written = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    args = (str(tmp_path / "tiny.gguf"), str(tmp_path / "cache" / "model"))
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        listings = pool.map(_convert, [args, args])
    assert listings[0] == listings[1] and "model.safetensors" in listings[0] and "tokenizer.json" in listings[0]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["model"]  # no .partial left behind
    weights = load_file(tmp_path / "cache" / "model" / "model.safetensors")
    assert np.array_equal(weights["model.embed_tokens.weight"].numpy(), written["token_embd.weight"])


def test_bundled_names_and_hub_ids_resolve_without_torch():
    assert bundled_name("smollm2") == bundled_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2"
    assert bundled_name("minilm") == bundled_name("sentence-transformers/all-MiniLM-L6-v2") == "minilm"
    assert bundled_name("gpt2") is None
    assert model_folder_problem("smollm2") is None and set(MODELS) == {"minilm", "smollm2"}
    code = "import fedtune.bundled, fedtune.inputs, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_the_bundled_smollm2_loads_as_a_classifier_named_by_its_hub_id(tmp_path, monkeypatch):
    """The real package: converted into $FEDTUNE_CACHE (about 30 s), then a Llama classifier that
    pools at the last non-pad token."""
    pytest.importorskip("gguf")
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    from fedtune.models import load_classifier, load_tokenizer

    model = load_classifier("smollm2", 2, label_names=("unacceptable", "acceptable"))
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_hidden_layers == 30 and model.config.pad_token_id == load_tokenizer("smollm2").pad_token_id
    assert model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert (tmp_path / "models" / "SmolLM2-135M-Instruct-Q4_1" / "model.safetensors").is_file()
