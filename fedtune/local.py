"""A client's round of work and the server's evaluation, as plain functions (no Flower).

Every function receives the Algorithm instance it works for (this module never looks one up,
so it does not import the registry). Models and data are cached per process: a simulation
actor or SuperNode loads the base weights and tokenizes once, then only swaps in the global
trainable state each round.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn

from fedtune import lockstep, scaffold
from fedtune.client_losses import client_loss_reads_features, reference_states
from fedtune.config import Settings
from fedtune.data import cached_task_data
from fedtune.devices import compute, evaluation_precision, model_device
from fedtune.models import State, classifier_layer, config_dropout, frozen, load_trainable_state, trainable_state
from fedtune.partition import client_partitions
from fedtune.tasks import task_spec
from fedtune.train import LocalWork, dev_loader, evaluate, local_steps, round_seed



class Algorithm(Protocol):
    """What this module needs of an algorithm (`fedtune.algorithms.base.Algorithm` provides it; this
    layer does not import the algorithms, which sit above it)."""

    settings: Settings

    @property
    def batchable(self) -> bool: ...

    def build_model(self, settings: Settings) -> nn.Module: ...

    def server_settings(self) -> Settings: ...

    def client_settings(self, partition_id: int) -> Settings: ...

    def local_train(self, model: nn.Module, rows, global_state: State, *, seed: int, lr: float, steps: int,
                    kept_state: State | None, extras: State) -> LocalWork: ...

_MODELS: dict[Settings, tuple[nn.Module, State]] = {}
_MAX_MODELS = 8  # the server's model and a few client ranks


_BUILDING = threading.Lock()  # batched clients ask from several threads


def _built_model(algorithm: Algorithm, settings: Settings) -> tuple[nn.Module, State]:
    with _BUILDING:
        return _build_once(algorithm, settings)


def _build_once(algorithm: Algorithm, settings: Settings) -> tuple[nn.Module, State]:
    if settings not in _MODELS:
        if len(_MODELS) >= _MAX_MODELS:
            del _MODELS[next(iter(_MODELS))]  # the oldest
        model = algorithm.build_model(settings).to(compute(settings.device, settings.precision, settings.models)[0])
        _MODELS[settings] = (model, trainable_state(model))
    return _MODELS[settings]


def cached_model(algorithm: Algorithm, settings: Settings) -> nn.Module:
    """The algorithm's model for `settings` (the server's or a client's), built once per process.

    Its trainable weights are whatever was loaded last: always load a state before use.
    """
    return _built_model(algorithm, settings)[0]


def initial_state(algorithm: Algorithm) -> State:
    """The global trainable state before round 1 (same on every process: seeded init)."""
    return {name: tensor.clone() for name, tensor in _built_model(algorithm, algorithm.server_settings())[1].items()}


def batched_clients(algorithm: Algorithm) -> bool:
    """Whether this run's clients train in lockstep (`batched-clients`; `fedtune.lockstep`): with
    `auto` on CUDA where that is exact, with `on` wherever it is exact, or a `ValueError` that says
    why it cannot be. Decided from
    the settings and the model's config, before any model is built (a fedkdlora student needs the
    teacher that the server trains first); `lockstep.Room.bind` checks the built model once more."""
    settings = algorithm.settings
    if settings.batched_clients == "off":
        return False
    why = [] if settings.engine == "local" else ["it needs engine local (Ray runs each client in an actor of its own)"]
    if not algorithm.batchable:
        why.append(f"{settings.algorithm} clients cannot share a step (`batchable`: they must build models whose "
                   f"base is frozen and train them with the default local training)")
    if settings.scaffold:
        why.append("scaffold=1 corrects each client's gradients on its own")
    if settings.freeze_head:
        why.append("freeze-head=1 freezes the classifier of the model each client trains, which batched clients share")
    if client_loss_reads_features(settings):
        why.append(f"client-loss {settings.client_loss} reads each client's features, which a shared step does not "
                   f"hand to each client's loss")
    if settings.secure_aggregation != "none":
        why.append("SecAgg+ sends each round's messages in stages that are not delivered together")
    if settings.compile:
        why.append("compile=1 traces one client's forward, and batched steps swap each client's tensors in")
    if compute(settings.device, settings.precision, settings.models)[1] == "fp16":
        why.append("fp16 scales each client's loss on its own")
    model_dropout = settings.model_dropout if settings.model_dropout >= 0 else config_dropout(settings.input_model)
    if model_dropout > 0 or settings.lora_dropout > 0:
        why.append("the model has dropout (one mask over all clients' rows would differ from one-at-a-time "
                   "training): set model-dropout 0 and lora-dropout 0")
    if why and settings.batched_clients == "on":
        raise ValueError("batched-clients=on, but " + "; ".join(why) + " (batched-clients auto or off run it)")
    # auto: on CUDA only. On a CPU it measured no faster (benchmarks `clients`: 1.01x at 4 clients a
    # round, 0.55x at 16): a CPU is not idle at one client's batch, and each step pads every
    # client's batch to the longest one's.
    on_cuda = compute(settings.device, settings.precision, settings.models)[0].type == "cuda"
    return not why and (settings.batched_clients == "on" or on_cuda)


def simulated_failure(settings: Settings, server_round: int, partition_id: int) -> bool:
    """Whether this client fails this round (`dropout` probability; reproducible by seed)."""
    if settings.dropout <= 0:
        return False
    return bool(np.random.default_rng([settings.seed, server_round, partition_id, 1]).random() < settings.dropout)


@dataclass
class ClientResult:
    state: State
    num_examples: int  # partition size: the aggregation weight
    examples_seen: int
    train_loss: float
    seconds: float
    kept_state: State | None = None  # what stays on the client (its teacher), if anything
    metrics: dict[str, float] = field(default_factory=dict)  # extra metrics to report
    steps: int = 0  # optimizer steps taken


def client_update(algorithm: Algorithm, partition_id: int, num_partitions: int, global_state: State,
                  server_round: int, lr: float, kept_state: State | None = None,
                  extras: State | None = None, correction: tuple[State, ...] | None = None,
                  previous_state: State | None = None) -> ClientResult:
    """Load the global state, train on this client's partition, return the new trainable state.

    `kept_state` is what this client kept from its previous round (FedKDLoRA's client teacher;
    None the first time); the result carries the updated one, which the caller stores locally
    and never sends. `extras` are the arrays the algorithm sent besides the state. `correction`
    = (c_i, c) or (c_i, c, sums): SCAFFOLD's control variates, applied to every gradient while it
    trains (`sums`, when given, gathers the raw gradients: `scaffold.corrected`).
    `previous_state`: the state this client trained in its last round, for a client loss that
    `reads_references` (MOON), which also sees `global_state`.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    settings = algorithm.settings
    model = cached_model(algorithm, algorithm.client_settings(partition_id))
    seated = lockstep.current()
    if seated:  # batched: the shared model is not ours alone; our trainable tensors are the member's own
        member = seated[1]
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        if trainable != set(global_state):
            raise ValueError("trainable state does not match the model: "
                             f"{sorted(trainable ^ set(global_state))[:3]}")
        member.params = {name: global_state[name].to(model_device(model), copy=True).requires_grad_()
                         for name in sorted(trainable)}
    else:
        load_trainable_state(model, global_state)
    rows = cached_task_data(settings).private.select(client_partitions(settings, num_partitions)[partition_id])
    with (scaffold.corrected(model, *correction) if correction else contextlib.nullcontext(),
          reference_states(global_state, previous_state), frozen(frozen_head(model, settings))):
        work = algorithm.local_train(model, rows, global_state, seed=round_seed(settings.seed, server_round, partition_id),
                                     lr=lr, steps=local_steps(settings, len(rows)), kept_state=kept_state,
                                     extras=extras or {})
    if model_device(model).type == "cuda":
        torch.cuda.empty_cache()  # the optimizer's state is gone with its turn; give its memory back
    state = ({name: p.detach().cpu().clone() for name, p in seated[1].params.items()} if seated
             else trainable_state(model))
    return ClientResult(state, len(rows), work.result.examples, work.result.loss,
                        work.result.seconds, work.kept_state, work.metrics, work.result.steps)


def frozen_head(model: nn.Module, settings: Settings) -> list[nn.Parameter]:
    """What `freeze-head` keeps from training on a client: the classifier's weights (none when off)."""
    if not settings.freeze_head:
        return []
    if (found := classifier_layer(model, task_spec(settings.task).num_labels)) is None:
        raise ValueError("freeze-head=1: the model has no classifier layer to freeze; use freeze-head=0")
    return list(found[1].parameters())


def evaluate_state(algorithm: Algorithm, state: State, final: bool = True) -> dict[str, float]:
    """Evaluation-set loss and metrics of the server's model holding `state`; `final` for the
    evaluation the run reports (fp32 on a CPU: `evaluation_precision`), not for a round along the way."""
    model = cached_model(algorithm, algorithm.server_settings())
    load_trainable_state(model, state)
    settings = algorithm.settings
    device, precision = compute(settings.device, settings.precision, settings.models)
    return evaluate(model, dev_loader(settings), settings.task, evaluation_precision(device, precision, final))
