"""Server-side SWA: the final model is the mean of the last rounds' global states.

Stochastic weight averaging on the server, as FedSWA (Caldarola et al., ECCV 2022, "Improving
Generalization in Federated Learning by Seeking Flat Minima") uses it against heterogeneous
clients: the global model still follows the rounds as before; after the last round the server
replaces it by the mean of the global states after each of the last `swa-rounds` rounds. No
client sends anything more. Under label skew the last rounds' models swing between the clients'
classes (docs/label-skew.md); their mean sits between the swings.

The mean is kept as a running mean (`running_mean`), so the checkpoint holds one extra state and
a resumed run continues it exactly.
"""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


def first_round(rounds: int, swa_rounds: int) -> int:
    """The first round whose global state enters the mean (rounds are 1-based); rounds + 1 when off."""
    return rounds - swa_rounds + 1 if swa_rounds > 0 else rounds + 1


def running_mean(mean: State, state: State, count: int) -> State:
    """The mean of `count` states, given the mean of the first `count - 1` (`mean`, ignored when
    count is 1) and the `count`-th (`state`): mean + (state - mean) / count, in float32."""
    if count == 1:
        return {name: tensor.detach().float().clone() for name, tensor in state.items()}
    return {name: mean[name] + (tensor.detach().float() - mean[name]) / count for name, tensor in state.items()}
