"""FedNova (Wang et al., NeurIPS 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization"): normalized averaging (`--fednova 1`).

With `local-epochs`, a client holding more rows takes more local steps (under Dirichlet label
skew here, 55 steps against 10), and the example-weighted mean of the clients' states then
follows the clients that stepped most: FedAvg converges to the optimum of an objective weighted
by p_i * tau_i, not p_i. FedNova divides each client's update by its local steps before
averaging and rescales the mean by the effective number of steps:

    d_i = (y_i - x) / a_i                 a_i = tau_i, the client's local steps
    x+  = x + tau_eff * sum_i p_i d_i     tau_eff = sum_i p_i a_i,  p_i = w_i / sum_j w_j

(x: the global state sent, y_i: client i's trained state, w_i: its aggregation weight, examples
or uniform by `client-weighting`). With equal steps this is the weighted mean itself. a_i = tau_i
is the paper's normalisation for plain local SGD (`client-optimizer sgd`); fedtune's default
AdamW clients get the same normalisation, which the paper does not derive (an Adam step moves
each weight by about the learning rate whatever the gradient, so an update still grows with its
steps). Each client reports its step count in its reply's metrics (`local-steps`); nothing else
travels. As the authors' code does, the server applies x+ with server learning rate 1 (no
server momentum of its own: `server-momentum` still applies after it).
"""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]
METRIC = "local-steps"  # the reply metric carrying a client's tau_i


def effective_steps(weights: list[float], steps: list[int]) -> float:
    """tau_eff = sum_i p_i tau_i, p_i = w_i / sum_j w_j."""
    total = float(sum(weights))
    return sum(w / total * t for w, t in zip(weights, steps))


def normalized_average(previous: State, states: list[State], weights: list[float], steps: list[int]) -> State:
    """x + tau_eff * sum_i p_i (y_i - x) / tau_i, key by key, accumulated in float64 in client order,
    cast back to each tensor's dtype."""
    if not states or not len(states) == len(weights) == len(steps):
        raise ValueError(f"need one weight and one step count per state, got {len(states)} states, "
                         f"{len(weights)} weights and {len(steps)} step counts")
    if not sum(weights) > 0 or min(steps) < 1:
        raise ValueError(f"weights must sum to > 0 and every client must take >= 1 step, got {weights} and {steps}")
    total, tau_eff = float(sum(weights)), effective_steps(weights, steps)
    mixed = {}
    for name, x in previous.items():
        update = torch.zeros(x.shape, dtype=torch.float64)
        for state, w, t in zip(states, weights, steps):
            update.add_(state[name].double() - x.double(), alpha=tau_eff * w / total / t)
        mixed[name] = (x.double() + update).to(x.dtype)
    return mixed
