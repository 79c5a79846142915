"""HetLoRA baseline (Cho et al. 2024): zero-pad every client's A and B to the largest rank,
average, and truncate back to each client's rank."""

from __future__ import annotations

from fedtune.algorithms.aggregate import State
from fedtune.algorithms.base import register
from fedtune.algorithms.flexlora import HeterogeneousRanks
from fedtune.algorithms.lora_maths import hetlora_aggregate, truncate_for_client


@register
class HetLoRA(HeterogeneousRanks):
    name = "hetlora"
    summary = "per-client LoRA ranks; zero-padded A/B averaged, truncated to each rank"

    def server_rank(self) -> int:
        return max(self.ranks)

    def client_state(self, global_state: State, partition_id: int) -> State:
        return truncate_for_client(global_state, self.ranks[partition_id], rescale=False)

    def aggregate(self, states: list[State], weights: list[float]) -> State:
        return hetlora_aggregate(states, weights, self.server_rank())
