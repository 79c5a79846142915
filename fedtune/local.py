"""A client's round of work and the server's evaluation, as plain functions (no Flower).

Models and data are cached per process: a simulation actor or SuperNode loads the base
weights and tokenizes once, then only swaps in the global trainable state each round.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from fedtune.algorithms import get_algorithm
from fedtune.algorithms.aggregate import State
from fedtune.config import Settings
from fedtune.data import cached_task_data, make_loader, tokenize
from fedtune.models import load_tokenizer, load_trainable_state, trainable_state
from fedtune.partition import client_partitions
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


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible seed for each (round, client)."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % 2**31


@dataclass
class ClientResult:
    state: State
    num_examples: int  # partition size: the aggregation weight
    examples_seen: int
    train_loss: float
    seconds: float


def client_update(settings: Settings, partition_id: int, num_partitions: int, global_state: State,
                  server_round: int, lr: float) -> ClientResult:
    """Load the global state, train on this client's partition, return the new trainable state."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    model = cached_model(get_algorithm(settings.algorithm, settings).client_settings(partition_id))
    load_trainable_state(model, global_state)
    data = cached_task_data(settings)
    rows = data.private.select(client_partitions(settings, num_partitions)[partition_id])
    tokenizer = load_tokenizer(settings.model)
    seed = round_seed(settings.seed, server_round, partition_id)
    seed_everything(seed)
    loader = make_loader(tokenize(rows, tokenizer, settings.max_length), tokenizer, settings.batch_size,
                         shuffle=True, seed=seed)
    steps = steps_for(len(loader), settings.local_epochs, settings.local_steps)
    result = train(model, loader, lr=lr, steps=steps, schedule="constant", weight_decay=settings.weight_decay)
    return ClientResult(trainable_state(model), len(rows), result.examples, result.loss, result.seconds)


@functools.lru_cache(maxsize=2)
def _eval_loader(settings: Settings):
    tokenizer = load_tokenizer(settings.model)
    data = cached_task_data(settings)
    return make_loader(tokenize(data.validation, tokenizer, settings.max_length), tokenizer,
                       settings.eval_batch_size, shuffle=False)


def evaluate_state(settings: Settings, state: State) -> dict[str, float]:
    """Dev-set loss and metrics of the server's model holding `state`."""
    model = cached_model(get_algorithm(settings.algorithm, settings).server_settings())
    load_trainable_state(model, state)
    return evaluate(model, _eval_loader(settings), settings.task)
