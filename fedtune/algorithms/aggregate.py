"""Aggregation maths: pure functions over state dicts (name -> tensor). No Flower, no config."""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


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
    return {
        name: sum((w / total) * state[name].double() for state, w in zip(states, weights)).to(states[0][name].dtype)
        for name in states[0]
    }


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
