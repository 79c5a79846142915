"""HetLoRA (Cho et al. 2024, arXiv 2401.06432): zero-pad every client's A and B to the largest
rank, aggregate, and truncate back to each client's rank.

Two choices keep it a fair baseline and close to the paper:
- scales: a client at rank r runs its LoRA at alpha / r, the server at alpha / R. Truncation
  multiplies B by r / R and padding by R / r, so a component means the same update on the
  client and on the server (FederatedScope's HetLoRA rescales on load for the same reason).
  `hetlora-rescale 0` gives the plain truncation and padding of the first version.
- aggregation: `hetlora-weighting sparsity` (the paper's, default) weighs each client's module
  by the Frobenius norm of its update (alpha / r_k) B_k A_k; `examples` by partition size.
The paper's rank self-pruning is not implemented.
"""

from __future__ import annotations

from fedtune.algorithms.aggregate import State
from fedtune.algorithms.base import register
from fedtune.algorithms.flexlora import HeterogeneousRanks
from fedtune.algorithms.lora_maths import hetlora_aggregate, truncate_for_client


@register
class HetLoRA(HeterogeneousRanks):
    name = "hetlora"
    version = 2  # 2: scales kept equal on client and server, sparsity-weighted aggregation
    summary = "per-client LoRA ranks; zero-padded A/B, norm-weighted mean, truncated; scales kept equal"

    def server_rank(self) -> int:
        return max(self.ranks)

    def client_state(self, global_state: State, partition_id: int) -> State:
        return truncate_for_client(global_state, self.ranks[partition_id], rescale=bool(self.settings.hetlora_rescale))

    def aggregate(self, states: list[State], weights: list[float]) -> State:
        s = self.settings
        return hetlora_aggregate(states, weights, self.server_rank(), rescale=bool(s.hetlora_rescale),
                                 sparsity_alpha=s.lora_alpha if s.hetlora_weighting == "sparsity" else None)
