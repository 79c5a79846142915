"""FlexLoRA (Bai et al. 2024): each client trains at its own LoRA rank; the server merges the
full-size deltas B @ A and SVD-splits the result back to every client's rank."""

from __future__ import annotations

from fedtune.algorithms.aggregate import State
from fedtune.algorithms.base import register
from fedtune.algorithms.fedlora import FedLoRA
from fedtune.algorithms.lora_maths import flexlora_aggregate, truncate_for_client
from fedtune.config import Settings
from fedtune.plugins import Option
from fedtune.ranks import RANK_DISTRIBUTIONS, assign_ranks

# The server keeps the merged delta as a LoRA of rank sum(r_k) (exact: W has at most that rank),
# capped here so a very large federation does not make the server model huge.
MAX_SERVER_RANK = 512


class HeterogeneousRanks(FedLoRA):
    """Shared by FlexLoRA and HetLoRA: a rank per client, a larger global LoRA on the server."""

    same_shape_updates = False
    options = {"rank_distribution": Option("heavy-tail-light", "how client ranks are drawn from rank-set",
                                           RANK_DISTRIBUTIONS),
               "rank_set": Option("4,8,16,32", "comma-separated ranks clients can have"),
               "client_ranks": Option("", "explicit comma-separated rank per client (overrides rank-distribution)")}

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.ranks = assign_ranks(settings.rank_distribution, settings.rank_set, settings.clients, settings.seed,
                                  settings.lora_r, settings.client_ranks)

    def server_rank(self) -> int:
        raise NotImplementedError

    def server_settings(self) -> Settings:
        return self.settings.replace(lora_r=self.server_rank())

    def client_settings(self, partition_id: int) -> Settings:
        return self.settings.replace(lora_r=self.ranks[partition_id])

    def summary_fields(self) -> dict:
        return {"lora_r": self.server_rank(), "client_ranks": self.ranks}


@register
class FlexLoRA(HeterogeneousRanks):
    name = "flexlora"
    summary = "per-client LoRA ranks; server merges B@A, SVD-splits back to each rank"
    rows = (("FlexLoRA", {}),)
    card = {"what trains": "LoRA A, B + head", "up (client -> server)": "A, B (own rank), head",
            "down (server -> client)": "SVD split to the client's rank",
            "aggregation exact": "best rank-r_k approximation", "own rank per client": "yes",
            "paper": "Bai et al. 2024"}

    def server_rank(self) -> int:
        return min(sum(self.ranks), MAX_SERVER_RANK)

    def client_state(self, global_state: State, partition_id: int) -> State:
        return truncate_for_client(global_state, self.ranks[partition_id], rescale=True)

    def aggregate(self, states: list[State], weights: list[float]) -> State:
        return flexlora_aggregate(states, weights, self.settings.lora_alpha, self.server_rank())
