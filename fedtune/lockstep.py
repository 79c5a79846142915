"""Batched clients: the simulated clients of a round train in lockstep over one shared frozen base.

Clients that share a frozen base differ only in their small trainable tensors (LoRA factors, the
head) and optimizer states. `Room` lets each client's own training loop (`fedtune.train.train`,
in its own thread) hand in one batch per step; when every client still training has handed one
in, the room concatenates them, runs the model once (the frozen base over all rows at once) with
each client's own trainable tensors applied to its own rows, sums the clients' losses and runs
one backward: client k's gradients are those of its own loss alone. Each client then steps its
own optimizer, and leaves the room when it has taken its steps.

What makes this exact: rows of a transformer batch do not interact (no batch norm), padding is
masked, and every module that owns a trainable tensor is a `Linear`, `Embedding` or `LayerNorm`
applied row-wise (`segmented_modules` refuses any other). Dropout would draw one mask over all
clients' rows, which one-at-a-time training would not, so batching refuses models with dropout
(`dropout_free`). The concatenation is in client order, so results do not depend on threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedtune.devices import autocast, to_device

SEGMENTABLE = (nn.Linear, nn.Embedding, nn.LayerNorm)
# Rows in one combined step at most: a round's clients train in rooms of ROOM_ROWS // batch-size
# (16 clients at batch 32), so memory stays that of one 512-row batch whatever the round's size.
ROOM_ROWS = 512
# On a CPU a combined step runs its rows in passes of at most this many tokens (rows x the pass's
# longest row), rows sorted by length: one pass padded to the longest row of all the clients' batches
# ran 3.6x the real tokens at 4 SST-2 clients (benchmarks `clients`). A GPU runs one pass: the more
# rows, the better it is used.
CHUNK_TOKENS = 4096


def segmented_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own a trainable tensor, by name; a `ValueError` if one is not row-wise."""
    owners = {}
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            if not isinstance(module, SEGMENTABLE):
                raise ValueError(f"batched clients: {name} ({type(module).__name__}) trains, and only "
                                 f"{', '.join(t.__name__ for t in SEGMENTABLE)} modules can train per client")
            owners[name] = module
    return owners


def dropout_free(model: nn.Module) -> bool:
    """Whether no dropout is left in `model` (modules, and the attention's own probabilities)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return False
        for attr in ("dropout_prob", "attention_dropout"):  # BERT's SDPA path, Llama's attention
            if isinstance(value := getattr(module, attr, 0.0), float) and value > 0:
                return False
    return True


def _apply(module: nn.Module, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """`module`'s own function of `x` with its parameters replaced by `tensors` where given."""
    weight = tensors.get("weight", module.weight)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, tensors.get("bias", module.bias))
    if isinstance(module, nn.Embedding):
        return F.embedding(x, weight, module.padding_idx, module.max_norm, module.norm_type,
                           module.scale_grad_by_freq, module.sparse)
    return F.layer_norm(x, module.normalized_shape, weight, tensors.get("bias", module.bias), module.eps)


def length_chunks(batches: list[dict[str, torch.Tensor]], tokens: int) -> list[tuple[list[tuple[int, int]], int]]:
    """The forward passes of one combined step: each a list of rows `(client, row)` and its width.
    Rows are sorted by their length (up to the last attended position; a left-padded row is as
    long as its batch) and cut where a pass would exceed `tokens` = rows x its longest row (0: one
    pass), so that a client with short rows does not pay for another's long ones; each pass is as
    wide as its longest row. Within a pass, rows come in client order (each client's rows one
    segment). Rows do not interact, so the passes give what one pass over the padded batch gives."""
    rows = []
    for k, batch in enumerate(batches):
        mask = batch["attention_mask"]
        ends = mask.shape[1] - mask.flip(1).argmax(1)  # one past the last attended position
        rows += [(int(end), k, i) for i, end in enumerate(ends)]
    passes, current = [], []
    for length, k, i in sorted(rows):
        if current and tokens and (len(current) + 1) * length > tokens:
            passes.append((sorted(current), width))
            current = []
        current.append((k, i))
        width = length
    return passes + [(sorted(current), width)] if current else passes


def _width(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """`x` (rows x positions) cut or right-padded with `value` to `width` positions."""
    return x[:, :width] if x.shape[1] >= width else F.pad(x, (0, width - x.shape[1]), value=value)


@dataclass
class Member:
    """One client in a room: its trainable tensors (full parameter names) and its place."""

    index: int  # the order of its rows in a combined batch
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    left: bool = False


@dataclass
class _Request:
    member: Member
    batch: dict[str, torch.Tensor]
    loss_fn: object
    optimizer: torch.optim.Optimizer | None
    loss: float | None = None
    error: BaseException | None = None


class _Rows:
    """What a client's loss function sees as the model: its own rows of the combined output."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, labels: torch.Tensor | None = None, **_) -> _Rows:
        if labels is not None:
            self.loss = F.cross_entropy(self.logits, labels)  # the classification models' own loss
        return self


class Room:
    """The `members` clients of one round that train together. Each, from its own thread, binds
    the model it trains (`bind`: the same for all), takes steps (`step`) and leaves when done
    (`leave`), also on an error: a member that has left is no longer waited for. One other thread
    runs the combined steps (`serve`) until all have left."""

    def __init__(self, members: int):
        self.model: nn.Module | None = None
        self.active = members
        self.pending: dict[int, _Request] = {}
        self.condition = threading.Condition()

    # ---- a member's side ------------------------------------------------------------------
    def bind(self, model: nn.Module, precision: str) -> None:
        with self.condition:
            if self.model is None:
                if not dropout_free(model):
                    raise ValueError("batched clients: the model has dropout, which they cannot draw as one "
                                     "client alone would")
                self.model, self.precision, self.owners = model, precision, segmented_modules(model)
            elif model is not self.model or precision != self.precision:
                raise ValueError("batched clients must all train the same model in the same precision")

    def step(self, member: Member, batch: dict[str, torch.Tensor], loss_fn,
             optimizer: torch.optim.Optimizer | None = None) -> float:
        """Forward and backward `batch` with the others' batches, so the member's tensors hold the
        gradients of its own loss, then `optimizer.step()` (if given) in the serving thread;
        returns the member's loss."""
        request = _Request(member, batch, loss_fn, optimizer)
        with self.condition:
            self.pending[member.index] = request
            self.condition.notify_all()
            while request.loss is None and request.error is None:
                self.condition.wait()
        if request.error is not None:
            raise RuntimeError(f"the batched step failed: {request.error}") from request.error
        return request.loss

    def leave(self, member: Member) -> None:
        with self.condition:
            if not member.left:
                member.left = True
                self.active -= 1
                self.condition.notify_all()

    # ---- the server's side ----------------------------------------------------------------
    def serve(self) -> None:
        """Run the combined steps until every member has left, in the calling thread: always the
        same thread, so PyTorch's CPU thread pool is that thread's one (a pool per calling thread,
        each spinning after its work, slowed batched steps on a CPU 2x when members took turns)."""
        while True:
            with self.condition:
                while not (self.active == 0 or (self.pending and len(self.pending) >= self.active)):
                    self.condition.wait()
                if self.active == 0 and not self.pending:
                    return
                requests = [self.pending.pop(i) for i in sorted(self.pending)]
            try:
                losses = self._combined_step(requests)
            except Exception as error:  # every waiting member gets it
                losses, failure = [None] * len(requests), error
            else:
                failure = None
            with self.condition:
                for request, loss in zip(requests, losses):
                    request.loss, request.error = loss, failure
                self.condition.notify_all()

    def _combined_step(self, requests: list[_Request]) -> list[float]:
        device = next(self.model.parameters()).device
        batches = [to_device(r.batch, device) for r in requests]
        sizes = [len(b["labels"]) for b in batches]
        pad_id = self.model.config.pad_token_id or 0
        tensors = [r.member.params for r in requests]
        starts = [sum(sizes[:k]) for k in range(len(batches))]  # client k's first row in the step's order
        outputs, order = [], []
        with autocast(device, self.precision):
            for chunk, width in length_chunks(batches, CHUNK_TOKENS if device.type == "cpu" else 0):
                parts = {k: torch.tensor([i for c, i in chunk if c == k], device=device)
                         for k in sorted({k for k, _ in chunk})}
                combined = {name: torch.cat([_width(batches[k][name][rows], width, pad_id if name == "input_ids" else 0)
                                             for k, rows in parts.items()])
                            for name in ("input_ids", "attention_mask")}
                with self._segmented([len(parts.get(k, ())) for k in range(len(batches))], tensors):
                    outputs.append(self.model(**combined).logits)
                order += [starts[k] + i for k, rows in parts.items() for i in rows.tolist()]
            # Each client's rows of the output, in its own batch's order.
            logits = torch.cat(outputs)[torch.argsort(torch.tensor(order, device=device))]
            losses = [r.loss_fn(_Rows(rows), b) for r, rows, b in zip(requests, logits.split(sizes), batches)]
        torch.stack(losses).sum().backward()
        for request in requests:  # here, not in the members' threads: one CPU thread pool
            if request.optimizer is not None:
                request.optimizer.step()
        return [loss.item() for loss in losses]

    def _segmented(self, sizes: list[int], tensors: list[dict[str, torch.Tensor]]):
        """While active, every trainable module applies member k's tensors to member k's rows."""
        room = self

        class _Patch:
            def __enter__(self):
                for name, module in room.owners.items():
                    own = [{local: t[f"{name}.{local}"] for local, _ in module.named_parameters(recurse=False)
                            if f"{name}.{local}" in t} for t in tensors]

                    def forward(x, module=module, own=own):
                        if x.shape[0] != sum(sizes):
                            raise ValueError(f"batched clients: a trainable module saw {x.shape[0]} rows, "
                                             f"not the batch's {sum(sizes)}")
                        return torch.cat([_apply(module, part, mine)
                                          for part, mine, n in zip(x.split(sizes), own, sizes) if n])

                    module.forward = forward
                return self

            def __exit__(self, *exc):
                for module in room.owners.values():
                    del module.forward  # back to the class's own
                return False

        return _Patch()


_local = threading.local()


def current() -> tuple[Room, Member] | None:
    """The room and member of this thread's client, if it trains batched."""
    return getattr(_local, "seat", None)


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s parameters by name, as this thread's client trains them: a batched client's own
    trainable tensors in place of the shared model's (a loss term on the weights, e.g. FedProx's,
    reads them here)."""
    params = dict(model.named_parameters())
    if seated := current():
        params.update(seated[1].params)
    return params


def seat(room: Room, member: Member | None) -> None:
    """Place this thread's client in `room` (None: it trains alone)."""
    _local.seat = (room, member) if member is not None else None
