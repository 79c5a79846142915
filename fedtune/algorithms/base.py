"""What every federated algorithm provides, and the registry that names them."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedtune.algorithms.aggregate import State, fedavgm_step, robust_aggregate
from fedtune.client_losses import task_loss
from fedtune.config import Settings
from fedtune.models import save_model
from fedtune.plugins import Option
from fedtune.tasks import task_spec
from fedtune.train import LocalWork, LossFn, schedule_factor, server_finetune, supervised_round


class Algorithm:
    """A federated fine-tuning method, and everything the rest of fedtune asks of one.

    Subclasses decide which model trains (its trainable parameters are exactly what
    travels), the local learning rate, how a client trains (`local_train`, `client_loss`),
    what the train message carries (`client_state`, `round_config`), how the server combines
    client states (`aggregate`) and what it does afterwards (`server_update`), and what the
    run's summary reports (`summary_fields`). The strategy, the server app and the client app
    only call these hooks, so a new algorithm is one module.

    Attributes
    ----------
    name : str
        Registry name, used by `--algorithm`.
    summary : str
        One line for `fedtune algorithms`.
    options : dict[str, Option]
        The settings this algorithm reads besides the core ones (`settings.<field>`, flag
        `--<field-with-dashes>`); subclasses inherit them. See `fedtune.plugins`.
    rows : tuple[tuple[str, dict], ...]
        The rows it adds to `fedtune compare`'s grid: (label, settings changes).
    card : dict[str, str]
        Its line of the README's algorithm table (column -> text).
    """

    name: str = ""
    summary: str = ""
    options: dict[str, Option] = {}
    rows: tuple[tuple[str, dict], ...] = ()
    card: dict[str, str] = {}
    version: int = 1  # raised when the maths change, so cached grid cells of the old maths are not reused
    # Every client sends the same keys and shapes; robust aggregation rules, DP noise and SecAgg+
    # act on such updates only (False for per-client LoRA ranks).
    same_shape_updates: bool = True
    lr_setting: str = "lora_lr"  # the Settings field holding the peak local learning rate (`compare --tune` tunes it)
    tunables: dict[str, tuple[float, ...]] = {}  # more Settings fields `compare --tune` tries, with their grids
    needs_teacher: bool = False  # the server pre-trains the teacher before round 1 (FedKDLoRA)
    teacher_on_client: bool = False  # clients keep a teacher across rounds (FedKDLoRA, client placement)

    def __init__(self, settings: Settings):
        self.settings = settings
        self.velocity: State = {}  # FedAvgM's server momentum (server-momentum > 0), empty until round 1
        self.check_settings()

    def check_settings(self) -> None:
        """Refuse settings this algorithm cannot honour, with one message naming them."""
        s = self.settings
        plain = {"aggregation=mean": s.aggregation != "mean", "dp-noise=0": s.dp_noise > 0,
                 "secure-aggregation=none": s.secure_aggregation != "none"}  # need: whether it is unmet

        def unmet(extra: dict[str, bool]) -> str:
            return ", ".join(need for need, wrong in {**extra, **plain}.items() if wrong)

        if not self.same_shape_updates and (needs := unmet({})):
            raise ValueError(f"{self.name} clients send updates of different shapes (each its own LoRA rank), so it "
                             f"needs {needs}: robust rules, DP noise and SecAgg+ need same-shape updates")
        if s.scaffold and (needs := unmet({"same-shape client states": not self.same_shape_updates,
                                           # fp16's grad scaler multiplies the gradients the correction hook
                                           # sees: c - c_i would be added in other units
                                           "precision bf16, fp32 or auto (not fp16)": s.precision == "fp16"})):
            raise ValueError(f"scaffold=1 averages one control variate per travelling tensor and sends each "
                             f"client's own in the clear: {self.name} here needs {needs}")
        own_mean = type(self).aggregate is not Algorithm.aggregate or not self.same_shape_updates
        if s.fednova and (needs := unmet({"the server's mean of same-shape states (not its own aggregate)": own_mean})):
            raise ValueError(f"fednova=1 rescales each client's update by its own step count before the mean: "
                             f"{self.name} here needs {needs}")
        if s.server_momentum > 0 and not self.same_shape_updates:
            raise ValueError(f"server-momentum={s.server_momentum} keeps one momentum per travelling tensor: "
                             f"{self.name}'s clients send states of different shapes; use server-momentum=0")
        if s.secure_aggregation != "none":
            # SecAgg+ rounds (fedtune.secure) send every client the global state and receive only the
            # masked sum: an algorithm that changes what is sent or how states combine cannot run there.
            own = [hook for hook in ("client_state", "downlink_extras", "aggregate")
                   if getattr(type(self), hook) is not getattr(Algorithm, hook)]
            if own:
                raise ValueError(f"{self.name} has its own {', '.join(own)}, which SecAgg+ rounds do not run (the server "
                                 f"sees only the masked weighted sum): use secure-aggregation=none")

    def build_model(self, settings: Settings) -> nn.Module:
        """The model for `settings` (the server's or one client's); its trainable parameters travel."""
        raise NotImplementedError

    def learning_rate(self) -> float:
        """Peak local learning rate (scaled per round by `lr-schedule`): the `lr_setting` field."""
        return getattr(self.settings, self.lr_setting)

    def round_lr(self, server_round: int) -> float:
        """The learning rate of round `server_round` (1-based): peak lr decayed by `lr-schedule` over rounds."""
        return self.learning_rate() * schedule_factor(self.settings.lr_schedule,
                                                      (server_round - 1) / self.settings.rounds)

    def server_settings(self) -> Settings:
        """Settings of the global model the server keeps and evaluates."""
        return self.settings

    def client_settings(self, partition_id: int) -> Settings:
        """Settings a client builds its model with (e.g. its own LoRA rank)."""
        return self.settings

    def client_state(self, global_state: State, partition_id: int) -> State:
        """What the server sends a client: by default the global state itself."""
        return global_state

    def downlink_extras(self, partition_id: int, server_round: int) -> State:
        """Arrays a client needs besides its state (e.g. updates of the frozen base), sent in the
        train message's `extras` record and counted in its bytes (default: none)."""
        return {}

    def round_config(self, server_round: int) -> dict[str, int | float | str]:
        """Extra entries of the train message's config besides `server-round`, `lr` and the
        run name (default: none)."""
        return {}

    def client_loss(self, model: nn.Module, global_state: State, task: LossFn) -> LossFn:
        """The loss a client minimises, given the state it received and `task`, the task loss on
        this client's rows (cross-entropy, or the `client-loss` plug-in). Default: `task`."""
        return task

    def local_train(self, model: nn.Module, rows, global_state: State, *, seed: int, lr: float, steps: int,
                    kept_state: State | None, extras: State) -> LocalWork:
        """A client's training of `model` (holding `global_state`) on its `rows`, in place.
        `kept_state` is what the client kept from its last round (default: nothing), `extras`
        what `downlink_extras` sent it."""
        task = task_loss(self.settings, rows, task_spec(self.settings.task).num_labels)
        return LocalWork(supervised_round(self.settings, model, rows, seed, lr, steps,
                                          self.client_loss(model, global_state, task), self.settings.client_optimizer))

    def aggregate(self, states: list[State], weights: list[float]) -> State:
        """Combine client states into the new global state: the `aggregation` rule (default:
        weighted mean by examples)."""
        s = self.settings
        return robust_aggregate(states, weights, s.aggregation, s.trim_fraction, s.krum_malicious)

    def checkpoint_state(self) -> State:
        """Server-side state besides the global model that a resumed run needs (default: none)."""
        return {}

    def restore(self, state: State, model: nn.Module) -> None:
        """Inverse of `checkpoint_state`, on a resumed server whose model is `model`."""

    def saved_state(self) -> State:
        """All server-side state the checkpoint keeps: `checkpoint_state`, and the server momentum."""
        return {**self.checkpoint_state(), **{f"{MOMENTUM}{k}": v for k, v in self.velocity.items()}}

    def load_saved(self, state: State, model: nn.Module) -> None:
        """Inverse of `saved_state`."""
        self.velocity = {k[len(MOMENTUM):]: v for k, v in state.items() if k.startswith(MOMENTUM)}
        self.restore({k: v for k, v in state.items() if not k.startswith(MOMENTUM)}, model)

    @property
    def batchable(self) -> bool:
        """Whether a round's clients may train in lockstep over a shared frozen base (`batched-clients`,
        `fedtune.lockstep`; clients with different `client_settings`, e.g. ranks, train in separate
        groups): true when they train with the default `local_train` and `client_loss` (whose loss
        reads only the model's logits). An algorithm that overrides one of those and still
        qualifies says so by overriding this."""
        return all(getattr(type(self), hook) is getattr(Algorithm, hook) for hook in ("local_train", "client_loss"))

    @property
    def uses_server_data(self) -> bool:
        """Whether the server trains on labelled data of its own (the public slice): such rows are
        marked in every table (default: with `server-finetune-steps` > 0)."""
        return self.settings.server_finetune_steps > 0

    def after_aggregation(self, model: nn.Module, state: State, server_round: int,
                          previous: State) -> tuple[State, dict[str, float]]:
        """What the server does with the aggregated `state`, `model` being the server's model (the
        runtime passes it in; its trainable weights hold whatever was loaded last): `server_update`,
        then `server-finetune-steps` steps on the public slice if asked. With `server-momentum`,
        the mean first becomes FedAvgM's step from `previous`."""
        if self.settings.server_momentum > 0:
            arrays = lambda tensors: {k: t.numpy() for k, t in tensors.items()}  # noqa: E731
            stepped, velocity = fedavgm_step(arrays(previous), arrays(state), arrays(self.velocity),
                                             self.settings.server_momentum)
            state = {k: torch.from_numpy(np.asarray(a)).to(state[k].dtype) for k, a in stepped.items()}
            self.velocity = {k: torch.from_numpy(np.asarray(a)) for k, a in velocity.items()}
        state, metrics = self.server_update(model, state, server_round, previous)
        if self.settings.server_finetune_steps > 0:
            state, loss = server_finetune(self.settings, model, state, server_round, self.round_lr(server_round))
            metrics = {**metrics, "server_finetune_loss": loss}
        return state, metrics

    def server_update(self, model: nn.Module, state: State, server_round: int,
                      previous: State) -> tuple[State, dict[str, float]]:
        """Server-side work after aggregation of `state`, `previous` being the global state the
        round started from, `model` the server's model: (new global state, metrics to record).
        Default: none."""
        return state, {}

    def save_model(self, model: nn.Module, folder) -> None:
        """Write the final global model (default: `save_pretrained`: full weights, or the PEFT adapter)."""
        save_model(model, folder)

    def summary_fields(self) -> dict:
        """What `summary.json` and `partitions.json` report about the model: the global LoRA rank
        (None without LoRA) and each client's rank (None when all train the global model)."""
        return {"lora_r": None, "client_ranks": None}


    @classmethod
    def declared_options(cls) -> dict[str, Option]:
        """Its own `options` and those of the classes it extends."""
        merged: dict[str, Option] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("options", {}))
        return merged


MOMENTUM = "server-momentum."  # the checkpoint's names of the momentum's tensors: MOMENTUM + state key
_REGISTRY: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: add an algorithm under `cls.name`; names are unique."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"algorithm {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def get_algorithm(name: str, settings: Settings | None = None) -> Algorithm:
    """The algorithm registered as `name`, configured by `settings` (defaults if None)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name](settings or Settings(algorithm=name))


def registered() -> dict[str, type[Algorithm]]:
    """Every registered algorithm, in registration order (the grid's and the tables' order)."""
    return dict(_REGISTRY)


def algorithm_names() -> list[str]:
    return sorted(_REGISTRY)
