"""Model resolution, teacher/student construction, LoRA wrapping and the travelling state."""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from fedtune.bundled import MODELS, bundled_folder, bundled_name
from fedtune.inputs import check_model_folder

# The hub id of each bundled model: what exports name as their base (so they load on any machine
# that can reach the hub), and what fedtune resolves to the bundled copy offline.
HUB_IDS = {name: model.hub_id for name, model in MODELS.items()}

# LoRA targets per architecture (`config.model_type`); override with `lora-targets`.
LORA_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


def resolve_model_path(spec: str) -> str:
    """A bundled model ('minilm', 'smollm2', or its hub id) -> its local folder; a local folder ->
    itself; anything else -> a hub id."""
    if name := bundled_name(spec):
        return str(bundled_folder(name))
    check_model_folder(spec)
    folder = Path(spec).expanduser()
    return str(folder) if folder.is_dir() else spec


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str):
    """Tokenizer for a model spec, with a pad token (decoder LMs such as Llama/GPT-2 lack one)."""
    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ValueError(f"could not load a tokenizer for model {spec!r} ({err}). Give 'minilm', 'smollm2', "
                         f"a local folder, or a hub id while online.") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def config_dropout(spec: str) -> float:
    """The largest dropout probability in the config of the model `spec` (its weights are not loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(spec)).to_dict()
    return max([v for k, v in config.items() if ("dropout" in k or "pdrop" in k) and isinstance(v, float)], default=0.0)


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout in `model` (and in its config, so a saved copy keeps it) set to `p`."""
    for name, value in model.config.to_dict().items():
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(model.config, name, p)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p  # BERT's attention reads its dropout.p at each call


def load_classifier(spec: str, num_labels: int, seed: int = 0, dropout: float = -1.0,
                    label_names: tuple[str, ...] = ()) -> PreTrainedModel:
    """A sequence classifier; the new head is initialised from `seed`, so loads repeat.
    `dropout` >= 0 replaces every dropout probability inside the model (-1 keeps the model's own);
    `label_names` go into its config (`id2label`, `label2id`: what an export shows its users)."""
    path = resolve_model_path(spec)
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    except OSError as err:
        raise ValueError(f"could not load model {spec!r} ({err}). Give 'minilm', 'smollm2', a local folder, "
                         f"or a hub id while online.") from err
    model.config.pad_token_id = tokenizer.pad_token_id  # decoder LMs pool at the last non-pad token
    if name := bundled_name(spec):
        hub_id = HUB_IDS[name]
        model.config._name_or_path = model.name_or_path = hub_id  # the hub id, not this machine's path
    if dropout >= 0:
        set_dropout(model, dropout)
    if label_names:
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {name: i for i, name in enumerate(label_names)}
    return model


def attention_of(model: nn.Module) -> str | None:
    """The attention implementation of the first transformers model inside `model`, or None."""
    return next((m.config._attn_implementation for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def set_attention(model: nn.Module, implementation: str) -> None:
    """Every transformers model inside `model` (a PEFT wrapper, a distillation pair) computes its
    attention with `implementation` ('eager', 'sdpa'); the weights, and what a saved copy loads
    with, do not change."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation != implementation:
            module.set_attn_implementation(implementation)


def save_model(model: nn.Module, folder) -> None:
    """`save_pretrained`: full weights, or a PEFT adapter (with the head; never the embeddings,
    which LoRA leaves as they are: peft would otherwise look the base up on the hub to check)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.save_pretrained(folder, save_embedding_layers=False)
    else:
        model.save_pretrained(folder)


def save_merged(model: nn.Module, folder) -> None:
    """Save a LoRA model with its adapters merged in, as plain transformers weights (the model
    itself is left as it was)."""
    copy.deepcopy(model).merge_and_unload().save_pretrained(folder)


def same_tokenizer(teacher_spec: str, student_spec: str) -> bool:
    """Whether two models read the same token ids (then distillation may also compare hidden states
    position by position; otherwise each model tokenizes the text itself)."""
    return teacher_spec == student_spec or load_tokenizer(teacher_spec).get_vocab() == load_tokenizer(student_spec).get_vocab()


# ---- teacher -> student ----------------------------------------------------------------
def find_layer_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The transformer block list (`encoder.layer`, `transformer.layer`, `layers`, `h`)."""
    n_layers = model.config.num_hidden_layers
    stacks = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.ModuleList) and len(module) == n_layers]
    if not stacks:
        raise ValueError(f"no list of {n_layers} transformer blocks found in {type(model).__name__}")
    name, stack = min(stacks, key=lambda item: item[0].count("."))  # outermost one
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name), attr, stack


def kept_blocks(teacher_layers: int, student_layers: int, blocks: str = "even") -> list[int]:
    """The teacher blocks a student of `student_layers` (S) blocks keeps, of the teacher's T.

    `even`: evenly spaced, the last one kept, block i -> (i + 1) * T // S - 1 (for S = T / 2:
    2i + 1, DistilBERT's and FedKD's map). `first`: blocks 0 .. S-2 and the last, i.e. a contiguous
    run of deep blocks before the last is dropped, the cut Gromov et al. (2024, "The Unreasonable
    Ineffectiveness of the Deeper Layers") found cheapest for large decoders; on SmolLM2-135M it
    measured worse than `even` at every size tried (`scripts/student_probe.py`, docs/results.md).
    """
    if blocks == "first":
        return list(range(student_layers - 1)) + [teacher_layers - 1]
    if blocks != "even":
        raise ValueError(f"student-blocks={blocks!r} (choose from: even, first)")
    return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers)]


def make_student(teacher: PreTrainedModel, layers: int = 0, blocks: str = "even") -> PreTrainedModel:
    """The teacher with `layers` of its blocks kept (0: half), as `kept_blocks(..., blocks)` picks them.

    With `even`, this is how DistilBERT was initialised from BERT, and it matches the hidden-state
    map of FedKD (teacher layer 2i+1 -> student layer i).
    """
    student = copy.deepcopy(teacher)
    parent, attr, stack = find_layer_stack(student)
    layers = layers or len(stack) // 2
    if not 0 < layers < len(stack):
        raise ValueError(f"student-layers={layers}: a student made from the teacher keeps between 1 and "
                         f"{len(stack) - 1} of its {len(stack)} blocks" if len(stack) > 1 else
                         "the teacher has a single block; give a student model explicitly")
    indices = kept_blocks(len(stack), layers, blocks)
    kept = nn.ModuleList(stack[i] for i in indices)
    setattr(parent, attr, kept)
    for new_index, block in enumerate(kept):
        for module in block.modules():  # decoder blocks index their KV cache by layer
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    student.config.num_hidden_layers = len(kept)
    if hasattr(student.config, "n_layers"):  # DistilBERT's name for it
        student.config.n_layers = len(kept)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in indices]
    return student


# ---- LoRA --------------------------------------------------------------------------------
def head_modules(model: PreTrainedModel) -> list[str]:
    """Names of the classification head: every top-level child with weights except the backbone."""
    backbone = model.base_model_prefix
    return [name for name, child in model.named_children()
            if name != backbone and any(True for _ in child.parameters())]


def lora_targets(model: PreTrainedModel, override: str = "") -> list[str]:
    """The module names LoRA wraps: `override` (comma-separated; each must name some of the model's
    layers, as peft matches them: the whole name or its last parts), or the architecture's default."""
    if override:
        targets = [name.strip() for name in override.split(",") if name.strip()]
        layers = [name for name, module in model.named_modules()
                  if not any(True for _ in module.children()) and any(True for _ in module.parameters(recurse=False))]
        if unmatched := [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise ValueError(f"lora-targets {', '.join(unmatched)}: no layer of model {model.config.model_type!r} has "
                             f"that name (its layers: {', '.join(leaves)})")
        return targets
    model_type = model.config.model_type
    if model_type not in LORA_TARGETS:
        raise ValueError(f"no default LoRA targets for architecture {model_type!r} "
                         f"(known: {', '.join(sorted(LORA_TARGETS))}); set lora-targets, e.g. 'q_proj,v_proj'")
    return LORA_TARGETS[model_type]


def check_lora_targets(spec: str, override: str) -> None:
    """`lora_targets` on a weightless copy of the model `spec` (no weights are read): a bad
    `lora-targets`, or an architecture without default targets, is refused before a run starts."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(spec))
    with torch.device("meta"):
        lora_targets(AutoModelForSequenceClassification.from_config(config), override)


def add_lora(model: PreTrainedModel, r: int, alpha: float, dropout: float = 0.0, targets: str = ""):
    """Freeze the base, add LoRA adapters, and keep the classification head trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_targets(model, targets),
                        modules_to_save=head_modules(model), task_type="SEQ_CLS")
    return get_peft_model(model, config)


# ---- the travelling state ------------------------------------------------------------------
State = dict[str, torch.Tensor]  # parameter name -> tensor: what travels, what is aggregated


def trainable_state(model: nn.Module) -> State:
    """Exactly the parameters that train: this is what a client sends."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}  # travels: CPU


def load_trainable_state(model: nn.Module, state: State) -> None:
    """Copy `state` into the trainable parameters; keys and shapes must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(f"trainable state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != state[name].shape:
                raise ValueError(f"shape of {name}: model {tuple(p.shape)}, state {tuple(state[name].shape)}")
            p.copy_(state[name])


def classifier_layer(model: nn.Module, num_labels: int) -> tuple[str, nn.Linear] | None:
    """The classifier: the last `nn.Linear` with `num_labels` outputs that is not a LoRA factor or
    peft's frozen original of the head (BERT's `classifier`, Llama's `score`, peft's trainable copy
    of either), or None. Found by name, so also while `frozen` holds it."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and m.out_features == num_labels
             and "lora_" not in name and "original_module" not in name]
    return found[-1] if found else None


@contextlib.contextmanager
def frozen(params: list[nn.Parameter]) -> Iterator[None]:
    """While inside, `params` do not train (no gradient, so no optimizer built inside holds them);
    afterwards each is as it was, so a trainable one stays in the state that travels."""
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
