"""FedProx (Li et al., MLSys 2020): FedLoRA's model, each client's loss plus a proximal term
mu/2 * ||w - w_global||^2 over the travelling parameters (LoRA A, B and the head), which keeps
local training near the global model when clients' data differ."""

from __future__ import annotations

import torch
from torch import nn

from fedtune.algorithms.aggregate import State
from fedtune.algorithms.base import register
from fedtune.algorithms.fedlora import FedLoRA
from fedtune.lockstep import parameters_of
from fedtune.plugins import Option
from fedtune.train import LossFn


def proximal_term(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum over (parameter, anchor) pairs of ||parameter - anchor||^2 (the anchors are constants)."""
    return sum(((p - anchor) ** 2).sum() for p, anchor in pairs)


@register
class FedProx(FedLoRA):
    name = "fedprox"
    summary = "FedLoRA + proximal term mu/2 ||w - w_global||^2 in each client's loss (prox-mu)"
    tunables = {"prox_mu": (0.001, 0.01, 0.1)}
    options = {"prox_mu": Option(0.01, "weight mu of the proximal term mu/2 * ||w - w_global||^2 on the "
                                 "travelling parameters", interval="[0, inf)")}
    rows = (("FedProx", {}),)
    card = {"what trains": "LoRA A, B + head, loss + mu/2·‖w - w_global‖²", "up (client -> server)": "as fedlora",
            "down (server -> client)": "as fedlora", "aggregation exact": "no", "own rank per client": "no",
            "paper": "Li et al. 2020"}

    batchable = True  # the proximal term reads the client's own tensors (`lockstep.parameters_of`)

    def client_loss(self, model: nn.Module, global_state: State, task: LossFn) -> LossFn:
        params = parameters_of(model)
        pairs = [(params[name], anchor.detach().clone()) for name, anchor in global_state.items()]
        mu = self.settings.prox_mu

        def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return task(model, batch) + 0.5 * mu * proximal_term(pairs)

        return loss
