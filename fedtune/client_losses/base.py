"""What a client loss provides, and the registry that names them (`--client-loss`).

A client loss replaces the cross-entropy a client trains with, for every algorithm whose clients
train with one (`Algorithm.local_train`'s default). It is built on the client from the client's
own label counts, which never leave it; evaluation always uses the model's plain logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import nn
from torch.func import functional_call

from fedtune.calibration import head_layer, pooled
from fedtune.plugins import Option
from fedtune.train import LogitLoss, LossFn, supervised_loss


class ClientLoss:
    """A loss on (logits, labels), knowing this client's label counts.

    Attributes
    ----------
    name : str
        Registry name, used by `--client-loss`.
    summary : str
        One line for `fedtune algorithms`.
    options : dict[str, Option]
        The settings it reads (see `fedtune.plugins`).
    reads_features : bool
        Whether `__call__` also takes `features`, the classifier's input of each row (B, D).
    reads_references : bool
        Whether `__call__` also takes `references`: the same rows' features (no gradient, eval
        mode) under the state the client received this round and under the state it trained in
        its last round (None before its first); the client keeps the latter on its own disk.
    """

    name: str = ""
    summary: str = ""
    options: dict[str, Option] = {}
    reads_features: bool = False
    reads_references: bool = False

    def __init__(self, settings, counts: torch.Tensor):
        self.settings = settings
        self.counts = counts  # rows of each class on this client, shape (num_labels,)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor,
                 features: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def declared_options(cls) -> dict[str, Option]:
        return dict(cls.options)


_REGISTRY: dict[str, type[ClientLoss]] = {}


def register(cls: type[ClientLoss]) -> type[ClientLoss]:
    """Class decorator: add a client loss under `cls.name`; names are unique ("none" is taken)."""
    if not cls.name or cls.name == "none":
        raise ValueError(f"{cls.__name__} needs a name other than 'none'")
    if cls.name in _REGISTRY:
        raise ValueError(f"client loss {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


class _NoLoss(ClientLoss):
    name = "none"
    summary = "plain cross-entropy (the model's own loss)"


def registered() -> dict[str, type[ClientLoss]]:
    """"none" and every registered client loss, in registration order."""
    return {"none": _NoLoss, **_REGISTRY}


def client_loss_reads_features(settings) -> bool:
    """Whether `settings.client_loss` reads the classifier's input besides the logits."""
    return registered().get(settings.client_loss, _NoLoss).reads_features


def client_loss_reads_references(settings) -> bool:
    """Whether `settings.client_loss` reads features under the received and the previous state."""
    return registered().get(settings.client_loss, _NoLoss).reads_references


State = dict[str, torch.Tensor]
_REFERENCES: ContextVar[tuple[State, State | None] | None] = ContextVar("client_loss_references", default=None)


@contextlib.contextmanager
def reference_states(received: State, previous: State | None) -> Iterator[None]:
    """While inside, a client loss that `reads_references` is built against these trainable
    states (the one the client received, the one it trained last round or None)."""
    token = _REFERENCES.set((received, previous))
    try:
        yield
    finally:
        _REFERENCES.reset(token)


def label_counts(labels, num_labels: int) -> torch.Tensor:
    """Rows of each class among `labels` (float, shape (num_labels,))."""
    return torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_labels).float()


def _registered(name: str) -> type[ClientLoss]:
    """The client-loss class registered under `name`, or one error naming the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown client-loss {name!r} (known: none, {', '.join(_REGISTRY)})")
    return _REGISTRY[name]


def task_loss(settings, rows, num_labels: int) -> LossFn:
    """The loss a client trains with on `rows`: the model's cross-entropy, or `client-loss`."""
    if settings.client_loss == "none":
        return supervised_loss
    loss = _registered(settings.client_loss)(settings, label_counts(rows["label"], num_labels))
    references = _REFERENCES.get()
    if loss.reads_references and references is None:
        raise ValueError(f"client-loss {settings.client_loss} compares each row's features with the model the client "
                         f"received and its last round's; algorithm {settings.algorithm} trains its clients without "
                         f"handing them over: use another client-loss")

    def on_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if not loss.reads_features:
            return loss(model(**inputs).logits.float(), batch["labels"])
        logits, features = logits_and_features(model, inputs, num_labels)
        if not loss.reads_references:
            return loss(logits.float(), batch["labels"], features.float())
        received, previous = references
        under = [None if state is None else reference_features(model, inputs, num_labels, state).float()
                 for state in (received, previous)]
        return loss(logits.float(), batch["labels"], features.float(), references=tuple(under))

    return on_logits


def losses_on_logits() -> list[str]:
    """The registered client losses that read (logits, labels) alone, in registration order."""
    return [name for name, c in _REGISTRY.items() if not (c.reads_features or c.reads_references)]


def logit_loss(settings, rows, num_labels: int) -> LogitLoss | None:
    """`client-loss` on (logits, labels) alone, built from `rows`' label counts, for a loss that
    combines with others' terms (FedKD's mutual distillation on a client); None for "none". A
    client loss that reads the classifier's features is refused: the caller runs no model for it."""
    if settings.client_loss == "none":
        return None
    cls = _registered(settings.client_loss)
    on_logits = losses_on_logits()
    if settings.client_loss not in on_logits:
        raise ValueError(f"client-loss {settings.client_loss} reads each row's features, which algorithm "
                         f"{settings.algorithm} does not hand to it here: use a loss on logits alone "
                         f"({', '.join(on_logits)})")
    loss = cls(settings, label_counts(rows["label"], num_labels))
    return lambda logits, labels: loss(logits.float(), labels)


def logits_and_features(model: nn.Module, inputs: dict[str, torch.Tensor], num_labels: int,
                        state: State | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the classifier's input of each row) in one forward pass, with autograd: the
    input of `calibration.head_layer`, at the position the model pools (`calibration.pooled`).
    With `state`, the model runs with those tensors in place of its parameters of the same names
    (`torch.func.functional_call`; the model itself is not changed)."""
    _, layer = head_layer(model, num_labels)
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    try:
        logits = (model(**inputs) if state is None else functional_call(model, state, args=(), kwargs=inputs,
                                                                          strict=False)).logits
    finally:
        hook.remove()
    return logits, pooled(captured[-1], inputs["input_ids"], model.config.pad_token_id)


def reference_features(model: nn.Module, inputs: dict[str, torch.Tensor], num_labels: int,
                       state: State) -> torch.Tensor:
    """The classifier's input of each row under `state`, in eval mode (no dropout), without autograd."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            params = dict(model.named_parameters())
            missing = sorted(set(state) - set(params))
            if missing:
                raise ValueError(f"the reference state names parameters the model does not have: {missing[:3]}")
            state = {k: v.to(device=params[k].device, dtype=params[k].dtype) for k, v in state.items()}
            return logits_and_features(model, inputs, num_labels, state)[1]
    finally:
        model.train(training)
