"""SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1 with option II): control variates that
correct each client's drift, for any algorithm whose clients send states of one shape
(`--scaffold 1`).

The server keeps a control variate c, the client i its own c_i (both start at zero, one tensor per
travelling parameter). Each round the server sends c beside the global state x; the client trains
with every gradient corrected to g - c_i + c, then (option II)

    c_i+ = c_i - c + (x - y) / (K * lr)        y: its trained state, K: its local steps

keeps c_i+ on its own disk and sends dc_i = c_i+ - c_i beside its state. The server aggregates the
states as the algorithm does and sets c <- c + (1 / N) * sum over the round's clients of dc_i, N
being the number of clients. Both variates are counted in the bytes down and up: they travel in
the messages, in an array record named `scaffold`.

fedtune's clients train with AdamW, not the paper's SGD: the correction is applied to the
gradient AdamW receives (as the public SCAFFOLD implementations do with other optimizers), and
option II's (x - y) / (K * lr) is then not the mean corrected gradient but AdamW's mean step over
its learning rate: about 1 per coordinate whatever the gradient (measured: |c_i| up to 1.0, mean
0.3-0.8, on LoRA weights whose gradients are some hundred times smaller), so c - c_i swamps the
gradient it corrects. `scaffold-variate mean-gradient` computes what option II stands for
directly: c_i+ = the mean of the raw (uncorrected) gradients of the client's K steps. Under plain
SGD the two are equal, since (x - y) / (K lr) = mean(g_k - c_i + c); under AdamW only the second
stays in the units of a gradient. No more compute, nothing more travels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

State = dict[str, torch.Tensor]
RECORD = "scaffold"  # the array record carrying c (down) and dc_i (up)


# ---- the maths (pure) -------------------------------------------------------------------------
def corrected_gradient(grad: torch.Tensor, c_local: torch.Tensor, c_global: torch.Tensor) -> torch.Tensor:
    """g - c_i + c."""
    return grad - c_local + c_global


def client_control(c_local: State, c_global: State, sent: State, trained: State, steps: int, lr: float) -> State:
    """Option II: c_i+ = c_i - c + (x - y) / (K * lr), per tensor."""
    return {k: c_local[k] - c_global[k] + (sent[k] - trained[k]) / (steps * lr) for k in sent}


def mean_gradient(sums: State, steps: int, like: State) -> State:
    """c_i+ = (1 / K) * sum over the client's K steps of its raw gradients (the `mean-gradient`
    variate), one tensor per key of `like`: zeros where no gradient came (a frozen head)."""
    return {k: (sums[k] / steps).cpu() if k in sums else torch.zeros_like(v) for k, v in like.items()}


def server_control(c_global: State, deltas: list[State], num_clients: int) -> State:
    """c + (1 / N) * sum of the round's dc_i (N: every client, sampled or not)."""
    return {k: c_global[k] + sum(d[k] for d in deltas) / num_clients for k in c_global}


def zeros_like(state: State) -> State:
    return {k: torch.zeros_like(v) for k, v in state.items()}


# ---- the client -------------------------------------------------------------------------------
@contextlib.contextmanager
def corrected(model: nn.Module, c_local: State, c_global: State, sums: State | None = None) -> Iterator[None]:
    """While inside, every gradient of a travelling parameter of `model` is g - c_i + c; with
    `sums`, each raw g is also added to sums[name] (fp32, on the parameter's device)."""
    params = dict(model.named_parameters())
    missing = sorted(set(c_global) - set(params))
    if missing:
        raise ValueError(f"SCAFFOLD variates name parameters the model does not have: {missing[:3]}")
    handles = []
    for name, c in c_global.items():
        shift = (c - c_local[name]).to(params[name].device)
        def hook(grad: torch.Tensor, shift: torch.Tensor = shift, name: str = name) -> torch.Tensor:
            if sums is not None:
                sums[name] = grad.detach().float() + sums[name] if name in sums else grad.detach().float()
            return grad + shift.to(grad.dtype)

        handles.append(params[name].register_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_variates(deltas: State, sent: State) -> str | None:
    """Why a client's dc_i cannot be used (keys, shapes, NaN/Inf), or None."""
    if set(deltas) != set(sent):
        return "its SCAFFOLD variate keys differ from the state's"
    for k, v in deltas.items():
        if v.shape != sent[k].shape:
            return f"SCAFFOLD variate {k} has shape {tuple(v.shape)}, expected {tuple(sent[k].shape)}"
        if not torch.isfinite(v).all():
            return f"SCAFFOLD variate {k} has NaN or Inf"
    return None
