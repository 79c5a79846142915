"""What a client loss provides, and the registry that names them (`--client-loss`).

A client loss replaces the cross-entropy a client trains with, for every algorithm whose clients
train with one (`Algorithm.local_train`'s default). It is built on the client from the client's
own label counts, which never leave it; evaluation always uses the model's plain logits.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtune.calibration import head_layer, pooled
from fedtune.plugins import Option
from fedtune.train import LossFn, supervised_loss


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
    """

    name: str = ""
    summary: str = ""
    options: dict[str, Option] = {}
    reads_features: bool = False

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


def label_counts(labels, num_labels: int) -> torch.Tensor:
    """Rows of each class among `labels` (float, shape (num_labels,))."""
    return torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_labels).float()


def task_loss(settings, rows, num_labels: int) -> LossFn:
    """The loss a client trains with on `rows`: the model's cross-entropy, or `client-loss`."""
    if settings.client_loss == "none":
        return supervised_loss
    if settings.client_loss not in _REGISTRY:
        raise ValueError(f"unknown client-loss {settings.client_loss!r} (known: none, {', '.join(_REGISTRY)})")
    loss = _REGISTRY[settings.client_loss](settings, label_counts(rows["label"], num_labels))

    def on_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if not loss.reads_features:
            return loss(model(**inputs).logits.float(), batch["labels"])
        logits, features = logits_and_features(model, inputs, num_labels)
        return loss(logits.float(), batch["labels"], features.float())

    return on_logits


def logits_and_features(model: nn.Module, inputs: dict[str, torch.Tensor],
                        num_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the classifier's input of each row) in one forward pass, with autograd: the
    input of `calibration.head_layer`, at the position the model pools (`calibration.pooled`)."""
    _, layer = head_layer(model, num_labels)
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    try:
        logits = model(**inputs).logits
    finally:
        hook.remove()
    return logits, pooled(captured[-1], inputs["input_ids"], model.config.pad_token_id)
