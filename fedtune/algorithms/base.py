"""What every federated algorithm provides, and the registry that names them."""

from __future__ import annotations

from torch import nn

from fedtune.algorithms.aggregate import State, robust_aggregate
from fedtune.config import Settings
from fedtune.train import schedule_factor


class Algorithm:
    """A federated fine-tuning method.

    Subclasses decide which model trains (its trainable parameters are exactly what
    travels), the local learning rate, and how the server combines client states.

    Attributes
    ----------
    name : str
        Registry name, used by `--algorithm`.
    summary : str
        One line for `fedtune algorithms`.
    """

    name: str = ""
    summary: str = ""
    lr_setting: str = "lora_lr"  # the Settings field holding the peak local learning rate (`compare --tune` tunes it)
    needs_teacher: bool = False  # the server pre-trains the teacher before round 1 (FedKDLoRA)
    teacher_on_client: bool = False  # clients keep a teacher across rounds (FedKDLoRA, client placement)

    def __init__(self, settings: Settings):
        self.settings = settings

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

    def aggregate(self, states: list[State], weights: list[float]) -> State:
        """Combine client states into the new global state: the `aggregation` rule (default:
        weighted mean by examples)."""
        s = self.settings
        return robust_aggregate(states, weights, s.aggregation, s.trim_fraction, s.krum_malicious)

    def checkpoint_state(self) -> State:
        """Server-side state besides the global model that a resumed run needs (default: none)."""
        return {}

    def restore(self, state: State) -> None:
        """Inverse of `checkpoint_state`."""

    def server_update(self, state: State, server_round: int) -> tuple[State, dict[str, float]]:
        """Server-side training after aggregation: (new global state, metrics to record). Default: none."""
        return state, {}


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


def algorithm_names() -> list[str]:
    return sorted(_REGISTRY)


def describe_algorithms() -> str:
    return "\n".join(f"{name:10s} {_REGISTRY[name].summary}" for name in algorithm_names())
