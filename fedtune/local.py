"""A client's round of work and the server's evaluation, as plain functions (no Flower).

Models and data are cached per process: a simulation actor or SuperNode loads the base
weights and tokenizes once, then only swaps in the global trainable state each round.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from fedtune.algorithms import get_algorithm
from fedtune.algorithms.aggregate import State
from fedtune.config import Settings
from fedtune.data import cached_task_data, eval_loader, tokenize, train_loader
from fedtune.distill import MutualDistillation
from fedtune.models import add_lora, load_tokenizer, load_trainable_state, trainable_state
from fedtune.partition import client_partitions
from fedtune.teacher import load_teacher, require_teacher
from fedtune.train import evaluate, seed_everything, steps_for, train


@functools.lru_cache(maxsize=8)  # the server's model and a few client ranks
def _built_model(settings: Settings) -> tuple[nn.Module, State]:
    model = get_algorithm(settings.algorithm, settings).build_model(settings)
    return model, trainable_state(model)


def cached_model(settings: Settings) -> nn.Module:
    """The algorithm's model for these settings, built once per process.

    Its trainable weights are whatever was loaded last: always load a state before use.
    """
    return _built_model(settings)[0]


def initial_state(settings: Settings) -> State:
    """The global trainable state before round 1 (same on every process: seeded init)."""
    server_settings = get_algorithm(settings.algorithm, settings).server_settings()
    return {name: tensor.clone() for name, tensor in _built_model(server_settings)[1].items()}


def simulated_failure(settings: Settings, server_round: int, partition_id: int) -> bool:
    """Whether this client fails this round (`dropout` probability; reproducible by seed)."""
    if settings.dropout <= 0:
        return False
    return bool(np.random.default_rng([settings.seed, server_round, partition_id, 1]).random() < settings.dropout)


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible seed for each (round, client)."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % 2**31


@functools.lru_cache(maxsize=2)
def _distillation(settings: Settings) -> tuple[MutualDistillation, State]:
    """The pre-trained teacher with LoRA, paired with the cached student; and the teacher's initial state."""
    teacher = load_teacher(require_teacher(settings))
    seed_everything(settings.seed)  # same teacher LoRA init on every process
    teacher = add_lora(teacher, settings.lora_r, settings.lora_alpha, settings.lora_dropout, settings.lora_targets)
    distiller = MutualDistillation(teacher, cached_model(settings), settings.kd_temperature, settings.kd_hidden_weight)
    return distiller, distiller.kept_state()


def distil(settings: Settings, rows, teacher_state: State | None, seed: int, lr: float, steps: int):
    """Mutual distillation of the teacher (from `teacher_state`, or its initial state) and the
    student (already loaded) on `rows`: (train result, new teacher state, teacher dev metrics)."""
    distiller, initial = _distillation(settings)
    distiller.load_kept_state(initial if teacher_state is None else teacher_state)
    tokenizer = load_tokenizer(settings.model)
    seed_everything(seed)
    loader = train_loader(rows, tokenizer, settings, seed)
    result = train(distiller, loader, lr=lr, steps=steps, schedule="constant", weight_decay=settings.weight_decay,
                   loss_fn=lambda model, batch: model.loss(batch))
    metrics = evaluate(distiller.teacher, _eval_loader(settings), settings.task)
    return result, distiller.kept_state(), metrics


def server_distillation(settings: Settings, student_state: State, teacher_state: State | None,
                        server_round: int, lr: float) -> tuple[State, State, dict[str, float]]:
    """FedKDLoRA's server step: mutual distillation on the public slice.

    Runs as many steps as an average client's local training (or `kd-server-steps`).
    Returns (new student state, new teacher state, teacher dev metrics).
    """
    data = cached_task_data(settings)
    if len(data.public) == 0:
        raise ValueError("kd-placement=server distils on the public slice, but public-fraction is 0")
    student = cached_model(settings)
    load_trainable_state(student, student_state)
    client_batches = math.ceil(len(data.private) / settings.clients / settings.batch_size)
    steps = settings.kd_server_steps or steps_for(client_batches, settings.local_epochs, settings.local_steps)
    seed = round_seed(settings.seed, server_round, settings.clients)  # partition ids are 0..clients-1
    _, teacher_state, metrics = distil(settings, data.public, teacher_state, seed, lr, steps)
    return trainable_state(student), teacher_state, {f"teacher_dev_{k}": v for k, v in metrics.items()}


@dataclass
class ClientResult:
    state: State
    num_examples: int  # partition size: the aggregation weight
    examples_seen: int
    train_loss: float
    seconds: float
    kept_state: State | None = None  # what stays on the client (its teacher), if anything
    metrics: dict[str, float] = field(default_factory=dict)  # extra metrics to report


def client_update(settings: Settings, partition_id: int, num_partitions: int, global_state: State,
                  server_round: int, lr: float, kept_state: State | None = None) -> ClientResult:
    """Load the global state, train on this client's partition, return the new trainable state.

    With a teacher on the client (FedKDLoRA, client placement), `kept_state` is the teacher
    this client kept from its previous round (None the first time); the result carries the
    updated one, which the caller stores locally and never sends.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    algorithm = get_algorithm(settings.algorithm, settings)
    model = cached_model(algorithm.client_settings(partition_id))
    load_trainable_state(model, global_state)
    data = cached_task_data(settings)
    rows = data.private.select(client_partitions(settings, num_partitions)[partition_id])
    seed = round_seed(settings.seed, server_round, partition_id)
    steps = steps_for(math.ceil(len(rows) / settings.batch_size), settings.local_epochs, settings.local_steps)
    if algorithm.teacher_on_client:
        result, kept_state, metrics = distil(settings, rows, kept_state, seed, lr, steps)
        return ClientResult(trainable_state(model), len(rows), result.examples, result.loss, result.seconds,
                            kept_state, {f"teacher-dev-{k}": v for k, v in metrics.items()})
    tokenizer = load_tokenizer(settings.model)
    seed_everything(seed)
    loader = train_loader(rows, tokenizer, settings, seed)
    result = train(model, loader, lr=lr, steps=steps, schedule="constant", weight_decay=settings.weight_decay)
    return ClientResult(trainable_state(model), len(rows), result.examples, result.loss, result.seconds)


@functools.lru_cache(maxsize=2)
def _eval_loader(settings: Settings):
    tokenizer = load_tokenizer(settings.model)
    data = cached_task_data(settings)
    return eval_loader(tokenize(data.validation, tokenizer, settings.max_length), tokenizer, settings.eval_batch_size)


def evaluate_state(settings: Settings, state: State) -> dict[str, float]:
    """Dev-set loss and metrics of the server's model holding `state`."""
    model = cached_model(get_algorithm(settings.algorithm, settings).server_settings())
    load_trainable_state(model, state)
    return evaluate(model, _eval_loader(settings), settings.task)
