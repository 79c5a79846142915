"""Aggregation maths: pure functions over state dicts (name -> tensor). No Flower, no config."""

from __future__ import annotations

import numpy as np
import torch

from fedtune.models import State  # noqa: F401  (re-exported: the algorithms' maths speak in States)


def weighted_mean(states: list[State], weights: list[float]) -> State:
    """sum_k w_k * state_k / sum_k w_k, key by key (FedAvg, McMahan et al. 2017).

    Accumulates in float64 in the given order, so the result does not depend on
    thread scheduling, then casts back to each tensor's dtype.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {weights}")
    mean = {}
    for name, first in states[0].items():
        accumulator = torch.zeros(first.shape, dtype=torch.float64)
        for state, w in zip(states, weights):
            accumulator.add_(state[name], alpha=w / total)  # in place: no float64 copy of each state
        mean[name] = accumulator.to(first.dtype)
    return mean


def invalid_reason(update: State, reference: State) -> str | None:
    """Why a client's update cannot be aggregated with `reference`, or None if it can."""
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing or extra:
        return f"keys differ from the global state (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, tensor in update.items():
        if tensor.shape != reference[name].shape:
            return f"{name} has shape {tuple(tensor.shape)}, expected {tuple(reference[name].shape)}"
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"{name} contains NaN or Inf"
    return None


def robust_aggregate(states: list[State], weights: list[float], method: str, trim_fraction: float = 0.2,
                     num_malicious: int = 1) -> State:
    """Byzantine-robust combination with Flower's own rules, key by key over the travelling state.

    - `median`: coordinate-wise median (FedMedian, Yin et al. 2018), unweighted;
    - `trimmed-mean`: drop the `trim_fraction` largest and smallest values per coordinate,
      average the rest (FedTrimmedAvg), unweighted;
    - `krum`: keep the one state with the smallest sum of squared distances to its
      n - f - 2 nearest others (Krum, Blanchard et al. 2017; f = `num_malicious`).
    `mean` is the example-weighted mean.
    """
    from flwr.app import ArrayRecord, RecordDict
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
    from flwr.serverapp.strategy.multikrum import select_multikrum

    if method == "mean":
        return weighted_mean(states, weights)
    if method == "krum":
        records = [RecordDict({"arrays": ArrayRecord({k: v.float() for k, v in s.items()})}) for s in states]
        chosen = select_multikrum(records, num_malicious_nodes=num_malicious, num_nodes_to_select=1)[0]
        return states[next(i for i, r in enumerate(records) if r is chosen)]
    if method == "median":
        combine = lambda stacked: np.median(stacked, axis=0)  # noqa: E731
    elif method == "trimmed-mean":
        combine = lambda stacked: trim_mean(stacked, trim_fraction)  # noqa: E731
    else:
        raise ValueError(f"unknown aggregation {method!r} (known: mean, median, trimmed-mean, krum)")
    return {name: torch.from_numpy(np.asarray(combine(np.stack([s[name].double().numpy() for s in states]))))
            .to(states[0][name].dtype) for name in states[0]}


def fedadam_step(current: dict[str, np.ndarray], averaged: dict[str, np.ndarray], m: dict[str, np.ndarray],
                 v: dict[str, np.ndarray], server_round: int, eta: float, beta1: float, beta2: float, tau: float,
                 bias_correction: str = "flower") -> tuple[dict, dict, dict]:
    """FedAdam's server step (Reddi et al., ICLR 2021, Algorithm 2), on numpy arrays:

        delta = averaged - current              (the pseudo-gradient)
        m <- beta1 m + (1 - beta1) delta        v <- beta2 v + (1 - beta2) delta^2
        current <- current + eta_t m / (sqrt(v) + tau)

    with eta_t = eta * sqrt(1 - beta2^e) / (1 - beta1^e), Kingma and Ba's bias-corrected step,
    where the exponent e is the choice named by `bias_correction`:
    - "flower": e = t + 1, as Flower's `FedAdam` computes it (at round 1: 0.74 * eta with the
      defaults, not Kingma and Ba's sqrt(0.01) / 0.1 = eta); fedtune's fedadam uses this, so its
      results equal Flower's strategy;
    - "kingma": e = t, Kingma and Ba's alpha_t.
    The paper's Algorithm 2 has no bias correction at all. Empty `m`/`v` start at zero. Returns
    (new current, m, v). The arithmetic is Flower's, term for term (numpy, same order)."""
    if bias_correction not in ("flower", "kingma"):
        raise ValueError(f"bias_correction={bias_correction!r} (choose from: flower, kingma)")
    delta = {k: x - current[k] for k, x in averaged.items()}
    m = {k: beta1 * m.get(k, np.zeros_like(x)) + (1 - beta1) * delta[k] for k, x in averaged.items()}
    v = {k: beta2 * v.get(k, np.zeros_like(x)) + (1 - beta2) * (delta[k] ** 2) for k, x in averaged.items()}
    exponent = server_round + 1.0 if bias_correction == "flower" else float(server_round)
    eta_t = eta * np.sqrt(1 - np.power(beta2, exponent)) / (1 - np.power(beta1, exponent))
    return {k: x + eta_t * m[k] / (np.sqrt(v[k]) + tau) for k, x in current.items()}, m, v


def fedavgm_step(current: dict[str, np.ndarray], averaged: dict[str, np.ndarray], velocity: dict[str, np.ndarray],
                 momentum: float) -> tuple[dict, dict]:
    """FedAvgM's server step (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data
    Distribution", the paper of the Dirichlet label-skew partition), server learning rate 1, on
    numpy arrays:

        g = current - averaged                  (the pseudo-gradient: the mean update, negated)
        v <- momentum v + g                     (v = g in the first round: empty `velocity`)
        current <- current - v

    Returns (new current, v). The arithmetic is Flower's `FedAvgM` strategy's, term for term."""
    gradient = {k: x - averaged[k] for k, x in current.items()}
    velocity = {k: momentum * velocity[k] + g if k in velocity else g for k, g in gradient.items()}
    return {k: x - velocity[k] for k, x in current.items()}, velocity
