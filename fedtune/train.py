"""Local training, the distillation loss, evaluation and a client's default round. Plain PyTorch: no Flower here."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedtune import lockstep
from fedtune.config import Settings
from fedtune.data import cached_task_data, eval_loader, tokenize, train_loader
from fedtune.devices import autocast, compute, model_device, to_device, training_attention
from fedtune.metrics import classification_metrics
from fedtune.models import (State, attention_of, load_tokenizer, load_trainable_state, set_attention,
                            trainable_state)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU) and numpy; CPU kernels are then deterministic for a fixed thread count."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def schedule_factor(schedule: str, progress: float) -> float:
    """Learning-rate multiplier at `progress` in [0, 1]: constant, linear or cosine decay to 0."""
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr-schedule {schedule!r} (known: constant, linear, cosine)")


def steps_for(num_batches: int, epochs: float, max_steps: int = 0) -> int:
    """Optimizer steps for `epochs` over `num_batches` (or exactly `max_steps` when > 0)."""
    return max_steps if max_steps > 0 else max(1, math.ceil(epochs * num_batches))


def cycle(loader) -> Iterator:
    """Endless batches; each pass reshuffles through the loader's seeded generator."""
    while True:
        yield from loader


LogitLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> loss


def distillation_losses(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor,
                        temperature: float = 1.0, task: LogitLoss | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FedKD's adaptive mutual distillation: (teacher loss, student loss).

    Each model's loss is its task cross-entropy plus the KL divergence from the other
    model's (detached) prediction, the KL divided by the sum of both task losses: when
    predictions are poor the models trust each other less. Logits are (B, num_labels).

    `task` (logits, labels) -> loss replaces each model's task term (a client's label-skew loss,
    e.g. logit adjustment); the weight and the KL terms keep the plain cross-entropy and logits:
    how far the models trust each other is how well they predict, and a calibrated loss can be 0
    (a client with one class), which would make the weight unbounded.
    """
    ce_teacher = F.cross_entropy(teacher_logits, labels)
    ce_student = F.cross_entropy(student_logits, labels)
    weight = 1.0 / (ce_teacher + ce_student).detach().clamp_min(1e-8)
    if task is not None:
        ce_teacher, ce_student = task(teacher_logits, labels), task(student_logits, labels)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    t2 = temperature**2  # keeps gradient size independent of T (Hinton et al.)
    kl_student = t2 * F.kl_div(log_p_student, log_p_teacher.detach(), log_target=True, reduction="batchmean")
    kl_teacher = t2 * F.kl_div(log_p_teacher, log_p_student.detach(), log_target=True, reduction="batchmean")
    return ce_teacher + weight * kl_teacher, ce_student + weight * kl_student


@dataclass
class TrainResult:
    loss: float  # mean training loss over the steps
    examples: int  # rows seen (a row seen twice counts twice)
    steps: int
    seconds: float


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def supervised_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def train(model: nn.Module, loader, *, lr: float, steps: int, schedule: str = "constant",
          weight_decay: float = 0.0, loss_fn: LossFn = supervised_loss, extra_params=(),
          on_step: Callable[[int, float, int], None] | None = None, precision: str = "fp32",
          compile: bool = False, optimizer: str = "adamw") -> TrainResult:
    """Run `steps` steps of `optimizer` (AdamW, or plain SGD) over `loader`, decaying lr by
    `schedule` over those steps, on the model's device, in `precision` (fp32; bf16 or fp16
    autocast, fp16 with a grad scaler); with `compile`, the model's forward compiled first (once
    per model object: `nn.Module.compile`).

    `on_step(step, mean_loss, examples)` runs after each step (progress bars, evaluation). On a
    CPU in bf16 the model trains with eager attention (`devices.training_attention`) and gets its
    own back afterwards.
    """
    device = model_device(model)
    seated = lockstep.current()  # a batched client: its own tensors, steps taken together with the round's others
    attention = training_attention(device, precision)
    # Evaluation and exports keep the model's own attention. Batched clients share the model, so one
    # that finishes early must not switch it back under the others (they leave it eager).
    restore = attention_of(model) if attention and not seated else None
    if attention:
        set_attention(model, attention)
    if compile and not seated and getattr(model, "_compiled_call_impl", None) is None:
        model.compile(dynamic=True)
    if seated:
        room, member = seated
        room.bind(model, precision)
        params = list(member.params.values()) + list(extra_params)
    else:
        params = [p for p in model.parameters() if p.requires_grad] + list(extra_params)
    optimizer = make_optimizer(optimizer, params, lr, weight_decay)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    model.train()
    total_loss, examples, start = 0.0, 0, time.perf_counter()
    batches = cycle(loader)
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * schedule_factor(schedule, step / steps)
            if seated:
                optimizer.zero_grad(set_to_none=True)
                batch = next(batches)
                total_loss += room.step(member, batch, loss_fn, optimizer)  # steps the optimizer too
            else:
                batch = to_device(next(batches), device)
                with autocast(device, precision):
                    loss = loss_fn(model, batch)
                optimizer.zero_grad(set_to_none=True)
                if scaler:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                total_loss += loss.item()
            examples += len(batch["labels"])
            if on_step:
                on_step(step + 1, total_loss / (step + 1), examples)
                model.train()  # the callback may have evaluated
    finally:
        if seated:
            room.leave(member)  # the others stop waiting for this client
        if restore and restore != attention:  # eager and SDPA differ in float error
            set_attention(model, restore)
    return TrainResult(total_loss / steps, examples, steps, time.perf_counter() - start)


def make_optimizer(name: str, params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """`adamw` (decoupled weight decay) or `sgd` (no momentum; weight decay as L2 in the gradient).
    AdamW runs fused (one kernel over every tensor, CPU and CUDA): on a CPU thread its step over
    all-MiniLM-L6-v2's 22.6M weights takes 14 ms instead of the per-tensor loop's 99 ms (a sixth of a
    FedAvg round), and agrees with it to float rounding."""
    if name == "adamw":
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)  # where torch has it
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (known: adamw, sgd)")


@torch.inference_mode()
def evaluate(model: nn.Module, loader, task: str, precision: str = "fp32") -> dict[str, float]:
    """Mean cross-entropy, accuracy, Matthews correlation for CoLA and ROC-AUC (on the model's device)."""
    model.eval()
    device = model_device(model)
    total_loss, rows, predictions, scores, labels = 0.0, 0, [], [], []
    for batch in loader:
        with autocast(device, precision):
            out = model(**to_device(batch, device))
        total_loss += out.loss.float().item() * len(batch["labels"])
        rows += len(batch["labels"])
        logits = out.logits.float()
        predictions.append(logits.argmax(-1).cpu().numpy())
        if logits.shape[-1] == 2:
            scores.append((logits[:, 1] - logits[:, 0]).cpu().numpy())
        labels.append(batch["labels"].numpy())
    metrics = classification_metrics(task, np.concatenate(labels), np.concatenate(predictions),
                                     np.concatenate(scores) if scores else None)
    return {"loss": total_loss / rows, **metrics}


# ---- a client's round of training (the algorithms' default local work) -------------------
def supervised_round(settings: Settings, model: nn.Module, rows, seed: int, lr: float, steps: int,
                     loss_fn: LossFn, optimizer: str = "adamw") -> TrainResult:
    """`steps` steps of `optimizer` on `loss_fn` over `rows` at a constant `lr` (the schedule runs over rounds)."""
    seed_everything(seed)
    loader = train_loader(rows, load_tokenizer(settings.input_model), settings, seed)
    return train(model, loader, lr=lr, steps=steps, schedule="constant", weight_decay=settings.weight_decay,
                 loss_fn=loss_fn, precision=compute(settings.device, settings.precision, settings.models)[1],
                 compile=bool(settings.compile), optimizer=optimizer)


@dataclass
class LocalWork:
    """What an algorithm's local training returns besides the model it trained in place."""

    result: TrainResult
    kept_state: State | None = None  # what stays on the client (its teacher), if anything
    metrics: dict[str, float] = field(default_factory=dict)  # extra metrics to report


# ---- round helpers shared by the clients, the server and the algorithms -------------------
def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible seed for each (round, client)."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % 2**31


def local_steps(settings: Settings, rows: int) -> int:
    """Optimizer steps of one client round over `rows` rows (`local-epochs` or `local-steps`)."""
    return steps_for(math.ceil(rows / settings.batch_size), settings.local_epochs, settings.local_steps)


@functools.lru_cache(maxsize=4)
def dev_loader(settings: Settings, model: str = ""):
    """Batches of the evaluation set (GLUE dev, or the holdout), built once per process, in the
    token ids of `model` (default: the federated model's, `settings.input_model`)."""
    tokenizer = load_tokenizer(model or settings.input_model)
    data = cached_task_data(settings)
    return eval_loader(tokenize(data.validation, tokenizer, settings.max_length), tokenizer, settings.eval_batch_size)


def server_finetune(settings: Settings, model: nn.Module, state: State, server_round: int,
                    lr: float) -> tuple[State, float]:
    """`server-finetune-steps` steps of the server's `model`, holding `state`, on the public slice
    (plain cross-entropy, the round's learning rate): (new state, mean training loss)."""
    public = cached_task_data(settings).public
    if len(public) == 0:
        raise ValueError("server-finetune-steps trains on the public slice, but public-fraction is 0")
    load_trainable_state(model, state)
    seed = round_seed(settings.seed, server_round, settings.clients + 1)  # distinct from every client's
    result = supervised_round(settings, model, public, seed, lr, settings.server_finetune_steps, supervised_loss)
    return trainable_state(model), result.loss
