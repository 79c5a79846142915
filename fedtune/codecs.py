"""Update codecs: what a client sends instead of its full fp32 state.

With a codec other than `none`, a client sends its *update* (new state minus the state it
received), encoded; the server decodes it and adds it back before checking and averaging.

- `fp16`: every tensor cast to float16 (half the bytes).
- `int8`: every tensor quantized to int8 with one fp32 absmax scale per tensor (a quarter).
- `int8-flat`: the same numbers, packed: every tensor's int8 update in one flat array (tensor
  names sorted) and their scales in one fp32 vector. Flower frames each array with ~510 bytes, so
  `int8` pays that twice per tensor; for an adapter of many small tensors (SmolLM2 r=2: 121
  tensors of ~1,000 values) the framing is as big as the payload, and packing halves the bytes.
  The server knows the names and shapes: it sent them.
- `int8-rows`: as `int8-flat`, with one absmax scale per row of every matrix (per output unit of a
  `Linear`, per token of an embedding; rows of 32 values or more, else one per tensor, as for a
  vector or a LoRA B of rank r < 32) instead of one per tensor: a tensor's largest value no longer
  sets the rounding step for all of it. all-MiniLM-L6-v2's weights, sent
  whole (`codec-down`), come back 8.0% off in norm with one scale per tensor (its position
  embeddings 17%) and 0.9% with one per row; one SST-2 batch's gradient (an update of one SGD step)
  10-11% and 3%, with 32-41% of its nonzero entries rounded to 0 against 6-9%. The scales cost
  4 bytes a row (+1% for MiniLM).
- `svd` (FedKD, Wu et al. 2022): each 2-D update M is sent as U_k, sigma_k, V_k with the
  smallest k whose energy sum_{i<=k} sigma_i^2 / sum_i sigma_i^2 reaches a threshold T;
  T grows linearly from `svd-energy-start` to `svd-energy-end` over the rounds. A matrix
  is sent as is when the factors would not be smaller, and so are 1-D tensors.

Encoded names are `<tensor name>@<part>`, so a decoder knows what it is reading.

`codec-down` encodes the other direction, the state the server broadcasts (`encode_broadcast`):
`fp16`, `int8` or `int8-flat` of the state itself, since a client keeps nothing between rounds.
An `int8-flat` broadcast carries its layout (names, shapes) in a `ConfigRecord`, as the client
has nothing to cut it by. The server keeps its exact state: a client trains from the decoded
copy, and the server adds the client's change to what it meant to send (`Broadcast.rebase`), so
the rounding of the broadcast never enters the global model.
"""

from __future__ import annotations

import torch

from fedtune.algorithms.aggregate import State
from fedtune.config import CODECS, CODECS_DOWN


def svd_energy(start: float, end: float, server_round: int, rounds: int) -> float:
    """Energy threshold for `server_round` (1-based): `start` in round 1, `end` in the last."""
    progress = (server_round - 1) / (rounds - 1) if rounds > 1 else 1.0
    return start + (end - start) * min(max(progress, 0.0), 1.0)


def svd_truncate(matrix: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k, S_k, Vh_k) with the smallest k whose share of sum(sigma^2) reaches `energy`.

    ||M - U_k diag(S_k) Vh_k||_F^2 equals the sum of the discarded sigma^2 (Eckart-Young).
    """
    U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    cumulative = torch.cumsum(S**2, 0)
    total = cumulative[-1]
    k = 1 if total == 0 else int(torch.searchsorted(cumulative, energy * total - 1e-12 * total)) + 1
    k = min(k, len(S))
    return U[:, :k].float(), S[:k].float(), Vh[:k].float()


def int8_quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, scale): int8 values in [-127, 127] and the fp32 absmax scale, tensor ~ values * scale."""
    scale = tensor.abs().max().float().clamp_min(1e-30) / 127.0
    return torch.round(tensor / scale).to(torch.int8), scale


ROW_VALUES = 32  # int8-rows: a row shorter than this shares one scale with its tensor (a LoRA B of rank r
# has rows of r values: a scale each would cost 4/r bytes a value)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as the matrix whose rows `int8-rows` scales one by one: dims past the first flattened,
    if that makes rows of `ROW_VALUES` or more; else (a vector, a scalar, a tall thin matrix) one row."""
    if tensor.dim() >= 2 and tensor.numel() >= ROW_VALUES * tensor.shape[0] > 0:
        return tensor.reshape(tensor.shape[0], -1)
    return tensor.reshape(1, -1)


def int8_quantize_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, scales): int8 values in [-127, 127] and one fp32 absmax scale per row (`_rows`),
    tensor ~ values * scales[row]."""
    rows = _rows(tensor.float())
    scales = rows.abs().amax(1).clamp_min(1e-30) / 127.0
    return torch.round(rows / scales[:, None]).to(torch.int8).reshape(tensor.shape), scales


def _encode_tensor(name: str, tensor: torch.Tensor, codec: str, energy: float) -> State:
    if codec == "fp16":
        return {f"{name}@fp16": tensor.half()}
    if codec == "int8":
        values, scale = int8_quantize(tensor)
        return {f"{name}@int8": values, f"{name}@scale": scale.reshape(1)}
    if codec == "svd" and tensor.dim() == 2:
        U, S, Vh = svd_truncate(tensor, energy)
        if U.numel() + S.numel() + Vh.numel() < tensor.numel():
            return {f"{name}@U": U, f"{name}@S": S, f"{name}@V": Vh}
    return {name: tensor}


def _decode_tensor(name: str, encoded: State) -> torch.Tensor:
    if f"{name}@fp16" in encoded:
        return encoded[f"{name}@fp16"].float()
    if f"{name}@int8" in encoded:
        return encoded[f"{name}@int8"].float() * encoded[f"{name}@scale"].float()
    if f"{name}@U" in encoded:
        U, S, Vh = (encoded[f"{name}@{part}"].float() for part in "USV")
        return (U * S) @ Vh
    return encoded[name]


FLAT_PARTS = ("@int8", "@scales")
ROW_PARTS = ("@int8", "@row-scales")  # int8-rows
PACKED = {"int8-flat": FLAT_PARTS, "int8-rows": ROW_PARTS}  # codecs whose tensors travel in one array
LAYOUT = "layout"  # the ConfigRecord of a packed (int8-flat, int8-rows) broadcast


def encode_flat(update: State, rows: bool = False) -> State:
    """`int8-flat`: every tensor of `update` quantized as `int8` does, packed in name order;
    `rows`: `int8-rows`, one scale per row (`int8_quantize_rows`), the scales in the same order."""
    quantize = int8_quantize_rows if rows else lambda tensor: int8_quantize(tensor.float())
    quantized = [quantize(update[name]) for name in sorted(update)]
    values, scales = ROW_PARTS if rows else FLAT_PARTS
    return {values: torch.cat([v.flatten() for v, _ in quantized]),
            scales: torch.cat([s.reshape(-1) for _, s in quantized])}


def decode_flat(encoded: State, sent: State) -> State:
    """The update packed by `encode_flat` (either form, told by its parts), cut back into the tensors
    of `sent` (same names and shapes)."""
    rows = sorted(encoded) == sorted(ROW_PARTS)
    if not rows and sorted(encoded) != sorted(FLAT_PARTS):
        raise ValueError(f"an int8-flat update is the arrays {FLAT_PARTS} (int8-rows: {ROW_PARTS}); "
                         f"got {sorted(encoded)[:4]}")
    names = sorted(sent)
    sizes = [sent[name].numel() for name in names]
    counts = [_rows(sent[name]).shape[0] if rows else 1 for name in names]
    values, scales = encoded["@int8"].flatten(), encoded[ROW_PARTS[1] if rows else "@scales"].flatten().float()
    if values.numel() != sum(sizes) or scales.numel() != sum(counts):
        raise ValueError(f"{'int8-rows' if rows else 'int8-flat'} update holds {values.numel()} values and "
                         f"{scales.numel()} scales; the {len(names)} tensors sent hold {sum(sizes)} values "
                         f"in {sum(counts)} {'rows' if rows else 'tensors'}")
    parts = torch.split(values.float(), sizes)
    return {name: (part.view(len(scale), -1) * scale[:, None]).view(sent[name].shape)
            for name, part, scale in zip(names, parts, torch.split(scales, counts))}


def encode_broadcast(state: State, codec: str) -> tuple[State, dict | None]:
    """(arrays, layout): the state the server sends, encoded by `codec` (one of `CODECS_DOWN`).

    `layout` ({"names": [...], "shapes": [ndim, *dims, ...]}) goes with an `int8-flat` or `int8-rows`
    broadcast (None otherwise). A tensor that is not floating point is sent as is.
    """
    if codec not in CODECS_DOWN:
        raise ValueError(f"unknown codec-down {codec!r} (known: {', '.join(CODECS_DOWN)})")
    plain = {name: tensor for name, tensor in state.items() if codec == "none" or not tensor.is_floating_point()}
    floating = {name: tensor.float() for name, tensor in state.items() if name not in plain}
    if codec in PACKED and floating:
        names = sorted(floating)
        shapes = [value for name in names for value in (floating[name].dim(), *floating[name].shape)]
        return plain | encode_flat(floating, rows=codec == "int8-rows"), {"names": names, "shapes": shapes}
    encoded = dict(plain)
    for name, tensor in floating.items():
        encoded.update(_encode_tensor(name, tensor, codec, 1.0))
    return encoded, None


def decode_broadcast(encoded: State, layout: dict | None = None) -> State:
    """The state a client trains from, rebuilt from `encode_broadcast`'s arrays (and layout).

    Raises ValueError when the arrays and the layout do not fit together.
    """
    state = {name: tensor for name, tensor in encoded.items() if "@" not in name}
    if layout is not None:
        names, dims = list(layout["names"]), list(layout["shapes"])
        shapes, at = [], 0
        for name in names:
            if at >= len(dims) or at + 1 + int(dims[at]) > len(dims):
                raise ValueError(f"broadcast layout ends before the shape of {name!r}")
            shapes.append(torch.Size(int(d) for d in dims[at + 1:at + 1 + int(dims[at])]))
            at += 1 + int(dims[at])
        template = {name: torch.empty(shape) for name, shape in zip(names, shapes)}
        flat = {part: encoded[part] for part in {*FLAT_PARTS, *ROW_PARTS} if part in encoded}
        return state | decode_flat(flat, template)
    for name in sorted({key.split("@")[0] for key in encoded if "@" in key}):
        try:
            state[name] = _decode_tensor(name, encoded)
        except KeyError as error:
            raise ValueError(f"encoded broadcast lacks {error.args[0]!r}") from None
    return state


class Broadcast:
    """What the server sends one client and what the client decodes from it (`codec-down`).

    Parameters
    ----------
    state : State
        The exact state the server means to send.
    codec : str
        One of `CODECS_DOWN`.
    """

    def __init__(self, state: State, codec: str):
        self.exact = state
        self.arrays, self.layout = encode_broadcast(state, codec)
        self.received = state if codec == "none" else decode_broadcast(self.arrays, self.layout)

    def rebase(self, trained: State) -> State:
        """A client's new state (trained from `received`) moved onto the exact state: exact + (new - received)."""
        if self.received is self.exact:
            return trained
        return {name: (self.exact[name].float() + (tensor.float() - self.received[name].float())).to(
            self.exact[name].dtype) for name, tensor in trained.items()}


class Codec:
    """Encodes a client's update and decodes it on the server.

    Parameters
    ----------
    name : str
        One of `CODECS`.
    energy_start, energy_end : float
        SVD energy threshold in the first and the last round.
    rounds : int
        Number of rounds (for the threshold schedule).
    """

    def __init__(self, name: str, energy_start: float = 0.95, energy_end: float = 0.98, rounds: int = 1):
        if name not in CODECS:
            raise ValueError(f"unknown codec {name!r} (known: {', '.join(CODECS)})")
        self.name, self.energy_start, self.energy_end, self.rounds = name, energy_start, energy_end, rounds

    def energy(self, server_round: int) -> float:
        return svd_energy(self.energy_start, self.energy_end, server_round, self.rounds)

    def encode(self, new: State, received: State, server_round: int) -> State:
        """What the client sends: its state (`none`) or its encoded update."""
        if self.name == "none":
            return new
        if self.name in PACKED:
            return encode_flat({name: tensor.float() - received[name].float() for name, tensor in new.items()},
                               rows=self.name == "int8-rows")
        energy = self.energy(server_round)
        encoded: State = {}
        for name, tensor in new.items():
            encoded.update(_encode_tensor(name, tensor.float() - received[name].float(), self.name, energy))
        return encoded

    def decode(self, encoded: State, sent: State) -> State:
        """The client's new state, rebuilt from what it sent and what it was sent.

        Raises ValueError (naming the tensor) when a part is missing or the shapes do not fit.
        """
        if self.name == "none":
            return encoded
        if self.name in PACKED:
            if sorted(encoded) != sorted(PACKED[self.name]):
                raise ValueError(f"an {self.name} update is the arrays {PACKED[self.name]}; got {sorted(encoded)[:4]}")
            updates = decode_flat(encoded, sent)
            return {name: (reference.float() + updates[name]).to(reference.dtype) for name, reference in sent.items()}
        state = {}
        for name, reference in sent.items():
            try:
                update = _decode_tensor(name, encoded)
            except KeyError as error:
                raise ValueError(f"encoded update lacks {error.args[0]!r}") from None
            except RuntimeError as error:  # factors of incompatible shapes
                raise ValueError(f"cannot decode {name!r}: {error}") from None
            if update.shape != reference.shape:
                raise ValueError(f"{name} decodes to shape {tuple(update.shape)}, expected {tuple(reference.shape)}")
            state[name] = (reference.float() + update).to(reference.dtype)
        known = {key.split("@")[0] for key in encoded}
        if extra := sorted(known - set(sent)):
            raise ValueError(f"encoded update has unexpected tensors {extra[:3]}")
        return state
