"""FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976): stacking-based exact aggregation with
heterogeneous ranks.

Each round every client trains a fresh LoRA at its own rank (`rank-distribution`, as FlexLoRA).
The server stacks the clients' factors, B = [w_1 s_1 B_1 ... w_K s_K B_K] and A = [A_1; ...; A_K]
(s_k = alpha / r_k), so B A is exactly the weighted sum of the clients' updates, folds it into
the frozen base on the server and on every client, and starts the next round from a new LoRA
(A drawn afresh from a seeded generator, B zero). The stacked factors travel down, so the
downlink grows with the sum of the clients' ranks (`base_merges`); the head is averaged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedtune.algorithms.aggregate import State, weighted_mean
from fedtune.algorithms.base import register
from fedtune.algorithms.base_merges import MergesIntoBase
from fedtune.algorithms.flexlora import HeterogeneousRanks
from fedtune.algorithms.lora_maths import flora_stack, split_lora, truncate_for_client


def fresh_lora(state: State, seed: int) -> State:
    """`state` with every LoRA pair re-initialised as peft does: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
    generator = torch.Generator().manual_seed(seed)
    pairs, _ = split_lora([state])
    out = dict(state)
    for a_key, b_key in pairs.values():
        bound = 1.0 / math.sqrt(state[a_key].shape[1])
        out[a_key] = (torch.rand(state[a_key].shape, generator=generator) * 2 - 1).to(state[a_key].dtype) * bound
        out[b_key] = torch.zeros_like(state[b_key])
    return out


@register
class FLoRA(MergesIntoBase, HeterogeneousRanks):
    name = "flora"
    summary = "per-client LoRA ranks; stacked B_k, A_k folded into the base exactly; fresh LoRA each round"
    rows = (("FLoRA", {}),)
    card = {"what trains": "a fresh LoRA each round + head", "up (client -> server)": "A, B (own rank), head",
            "down (server -> client)": "fresh LoRA, head + stacked factors, rank Σ r_k",
            "aggregation exact": "yes (stack into the base)", "own rank per client": "yes", "paper": "Wang et al. 2024"}

    def server_rank(self) -> int:
        return max(self.ranks)

    def client_state(self, global_state: State, partition_id: int) -> State:
        return truncate_for_client(global_state, self.ranks[partition_id], rescale=False)  # B is zero

    def round_update(self, states: list[State], weights: list[float]):
        alpha = self.settings.lora_alpha
        pairs, _ = split_lora(states)
        return {prefix: flora_stack([s[a] for s in states], [s[b] for s in states], weights,
                                    [alpha / s[a].shape[0] for s in states])
                for prefix, (a, b) in pairs.items()}

    def aggregate(self, states: list[State], weights: list[float]) -> State:
        self.stage(states, weights)
        _, others = split_lora(states)
        return weighted_mean([{k: s[k] for k in others} for s in states], weights)  # the head; LoRA restarts

    def server_update(self, model: nn.Module, state: State, server_round: int,
                      previous: State) -> tuple[State, dict[str, float]]:
        _, metrics = super().server_update(model, state, server_round, previous)
        # The next round's global state: the averaged head and a new LoRA at the server's rank.
        fresh = fresh_lora(previous, seed=self.settings.seed * 1_000_003 + server_round)
        return {k: state.get(k, fresh[k]) for k in previous}, metrics
