"""HetLoRA (Cho et al. 2024, arXiv 2401.06432): zero-pad every client's A and B to the largest
rank, aggregate, and truncate back to each client's rank.

Two choices keep it a fair baseline and close to the paper:
- scales: a client at rank r runs its LoRA at alpha / r, the server at alpha / R. Truncation
  multiplies B by r / R and padding by R / r, so a component means the same update on the
  client and on the server (FederatedScope's HetLoRA rescales on load for the same reason).
  `hetlora-rescale 0` gives the plain truncation and padding of the first version.
- aggregation: `hetlora-weighting sparsity` (the paper's, default) weighs each client's module
  by the Frobenius norm of its update (alpha / r_k) B_k A_k; `examples` by partition size.
- rank self-pruning (`hetlora-prune` gamma, `hetlora-prune-weight` lambda): a client adds
  lambda * sum ||A_tail|| ||B_tail|| over the components past int(gamma * r) to its loss; when
  its local training shrank that tail, it cuts its rank to int(gamma * r) for good (the rank is
  kept on its own disk). A cut component is zero in its reply, which zero-padding aggregation
  reads as a smaller rank; the reply keeps its shape, so the bytes sent do not shrink.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from fedtune.algorithms.aggregate import State
from fedtune.algorithms.base import register
from fedtune.algorithms.flexlora import HeterogeneousRanks
from fedtune.algorithms.lora_maths import hetlora_aggregate, tail_norm, truncate_for_client
from fedtune.plugins import Option
from fedtune.train import LocalWork, LossFn


def lora_parameters(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) weight parameters of every LoRA module of `model`."""
    return [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in model.modules()
            if isinstance(m, LoraLayer) and "default" in m.lora_A]


@torch.no_grad()
def cut_rank(pairs: list[tuple[torch.Tensor, torch.Tensor]], rank: int) -> None:
    """Zero every component past `rank` (they then get no gradient: B_tail A_tail stays 0)."""
    for A, B in pairs:
        A[rank:] = 0
        B[:, rank:] = 0


@register
class HetLoRA(HeterogeneousRanks):
    name = "hetlora"
    version = 2  # 2: scales kept equal on client and server, sparsity-weighted aggregation, self-pruning
    keep = 0  # while a client trains: the components its pruning regulariser leaves alone
    summary = "per-client LoRA ranks; zero-padded A/B, norm-weighted mean, truncated; scales kept equal"
    options = {
        "hetlora_weighting": Option("sparsity", "weigh each client's LoRA module by the norm of its update "
                                    "(sparsity, the paper's) or by its examples", ("sparsity", "examples")),
        "hetlora_prune": Option(0.99, "rank self-pruning decay gamma; a client whose local training shrank the tail "
                                "of its LoRA beyond gamma*r cuts its rank to int(gamma*r) (1: off)", interval="(0, 1]"),
        "hetlora_prune_weight": Option(0.01, "weight of the self-pruning regulariser sum_modules ||A_tail|| * "
                                       "||B_tail||", interval="[0, inf)"),
        "hetlora_rescale": Option(1, "1 rescales B on truncation and padding so a component means the same update "
                                  "at the client's scale alpha/r and the server's alpha/R; 0: plain", interval="[0, 1]"),
    }
    rows = (("HetLoRA", {}),)
    card = {"what trains": "LoRA A, B + head (+ rank self-pruning)", "up (client -> server)": "A, B (own rank), head",
            "down (server -> client)": "truncation to the client's rank",
            "aggregation exact": "no (zero-padding, norm-weighted)", "own rank per client": "yes",
            "paper": "Cho et al. 2024"}

    def server_rank(self) -> int:
        return max(self.ranks)

    def client_state(self, global_state: State, partition_id: int) -> State:
        return truncate_for_client(global_state, self.ranks[partition_id], rescale=bool(self.settings.hetlora_rescale))

    def client_loss(self, model: nn.Module, global_state: State, task: LossFn) -> LossFn:
        pairs, weight, keep = lora_parameters(model), self.settings.hetlora_prune_weight, self.keep
        if weight == 0 or self.settings.hetlora_prune >= 1:
            return task
        return lambda model, batch: task(model, batch) + weight * tail_norm(pairs, keep)

    def local_train(self, model: nn.Module, rows, global_state: State, *, seed: int, lr: float, steps: int,
                    kept_state: State | None, extras: State) -> LocalWork:
        """FedLoRA's training at the client's current rank, then self-pruning (see the module doc)."""
        pairs = lora_parameters(model)
        rank = int(kept_state["rank"]) if kept_state else pairs[0][0].shape[0]
        cut_rank(pairs, rank)  # components cut in an earlier round stay cut
        self.keep = max(1, int(self.settings.hetlora_prune * rank))
        with torch.no_grad():
            before = float(tail_norm(pairs, self.keep))
        work = super().local_train(model, rows, global_state, seed=seed, lr=lr, steps=steps, kept_state=kept_state,
                                   extras=extras)
        with torch.no_grad():
            after = float(tail_norm(pairs, self.keep))
        if self.keep < rank and after < before:
            rank = self.keep
            cut_rank(pairs, rank)
        work.kept_state = {"rank": torch.tensor(rank)}
        return work

    def aggregate(self, states: list[State], weights: list[float]) -> State:
        s = self.settings
        return hetlora_aggregate(states, weights, self.server_rank(), rescale=bool(s.hetlora_rescale),
                                 sparsity_alpha=s.lora_alpha if s.hetlora_weighting == "sparsity" else None)
