"""FedEx-LoRA (Singhal et al., ACL 2025, arXiv 2410.09432): exact aggregation for FedLoRA.

Averaging A and B separately gives mean(B) mean(A), not the mean of the clients' updates
mean_k(B_k A_k). FedEx-LoRA keeps FedLoRA's averaged A and B as the global adapter and folds
the residual scale * (mean_k(B_k A_k) - mean(B) mean(A)) into the frozen base weights, on the
server and on every client, so base + scale * B A equals base + the clients' mean update
exactly. The residual travels down as factors of rank (clients + 1) * r per module, counted in
the bytes down (`base_merges`). Needs aggregation=mean.
"""

from __future__ import annotations

from fedtune.algorithms.aggregate import State
from fedtune.algorithms.base import register
from fedtune.algorithms.base_merges import MergesIntoBase
from fedtune.algorithms.lora_maths import fedex_residual, lora_pairs


@register
class FedExLoRA(MergesIntoBase):
    name = "fedex-lora"
    summary = "FedLoRA + the residual mean(BA) - mean(B)mean(A) folded into the base: exact aggregation"
    rows = (("FedEx-LoRA", {}),)
    card = {"what trains": "LoRA A, B + head", "up (client -> server)": "A, B, head",
            "down (server -> client)": "A, B, head + residual factors, rank (K+1)·r",
            "aggregation exact": "yes (residual into the base)", "own rank per client": "no",
            "paper": "Singhal et al. 2025"}

    def check_settings(self) -> None:
        super().check_settings()
        if self.settings.aggregation != "mean":
            raise ValueError("fedex-lora folds the residual of the weighted mean into the base: it needs "
                             "aggregation=mean")

    def round_update(self, states: list[State], weights: list[float]):
        scale = self.settings.lora_alpha / self.settings.lora_r
        return {prefix: fedex_residual([s[a] for s in states], [s[b] for s in states], weights, scale)
                for prefix, (a, b) in lora_pairs(states[0]).items()}

    def aggregate(self, states: list[State], weights: list[float]) -> State:
        self.stage(states, weights)
        return super().aggregate(states, weights)  # the averaged A, B and head
