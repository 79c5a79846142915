"""FedDyn (Acar et al., ICLR 2021, "Federated Learning Based on Dynamic Regularization",
Algorithm 1): FedLoRA's model; each client adds a dynamic regulariser to its loss that makes the
stationary points of the local objectives agree with the global one, however the data differ.

Client k, receiving the global state x (LoRA A, B and the head), with g_k kept on its own disk
from its last round (zeros before its first):

    loss(w) = L_k(w) - <g_k, w> + alpha/2 ||w - x||^2
    g_k+    = g_k - alpha (y_k - x)                  y_k: its trained state

The server keeps h (zeros at first) and, with P the round's clients and m every client,

    h+ = h - alpha/m * sum_{k in P} (y_k - x)
    x+ = (1/|P|) sum_{k in P} y_k - h+ / alpha

The mean is unweighted, as in the paper (whatever `client-weighting` says); h is in the
checkpoint, so a resumed run equals an uninterrupted one. Nothing but the state travels. The
paper's clients run SGD; with AdamW clients (the default) the regulariser is the same, the
first-order condition that g_k+ tracks then holds only approximately (as for SCAFFOLD here).
"""

from __future__ import annotations

import torch
from torch import nn

from fedtune.algorithms.aggregate import State, robust_aggregate
from fedtune.algorithms.base import register
from fedtune.algorithms.fedlora import FedLoRA
from fedtune.client_losses import task_loss
from fedtune.lockstep import parameters_of
from fedtune.plugins import Option
from fedtune.tasks import task_spec
from fedtune.train import LocalWork, supervised_round


# ---- the maths (pure) -------------------------------------------------------------------------
def regulariser(pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], alpha: float) -> torch.Tensor:
    """sum over (parameter w, kept g_k, received x) of -<g_k, w> + alpha/2 ||w - x||^2."""
    return sum(-(g * w).sum() + 0.5 * alpha * ((w - x) ** 2).sum() for w, g, x in pairs)


def client_state_update(kept: State, trained: State, received: State, alpha: float) -> State:
    """g_k+ = g_k - alpha (y_k - x), per tensor."""
    return {k: kept[k] - alpha * (trained[k] - received[k]) for k in received}


def server_state_update(h: State, mean: State, previous: State, clients_in_round: int, num_clients: int,
                        alpha: float) -> tuple[State, State]:
    """From the unweighted mean of the round's states: h+ = h - alpha/m * |P| (mean - x) (that is,
    alpha/m times the sum of the clients' moves), and x+ = mean - h+ / alpha. Returns (x+, h+)."""
    h_new = {k: h[k] - alpha * clients_in_round / num_clients * (mean[k] - previous[k]) for k in previous}
    return {k: mean[k] - h_new[k] / alpha for k in previous}, h_new


# ---- the algorithm ----------------------------------------------------------------------------
@register
class FedDyn(FedLoRA):
    name = "feddyn"
    summary = "FedLoRA + dynamic regularisation: each client's loss - <g_k, w> + alpha/2 ||w - x||^2 (feddyn-alpha)"
    tunables = {"feddyn_alpha": (0.001, 0.01, 0.1)}
    options = {"feddyn_alpha": Option(0.01, "alpha of FedDyn's dynamic regulariser (the paper tries 0.1, 0.01 "
                                      "and 0.001)", interval="(0, inf)")}
    rows = (("FedDyn", {}),)
    card = {"what trains": "LoRA A, B + head, loss - <g_k, w> + alpha/2·‖w - x‖²", "up (client -> server)": "as fedlora",
            "down (server -> client)": "as fedlora", "aggregation exact": "no", "own rank per client": "no",
            "paper": "Acar et al. 2021"}

    def __init__(self, settings):
        super().__init__(settings)
        self.h: State = {}  # the server's state, zeros until round 1
        self.clients_in_round = 0

    def check_settings(self) -> None:
        super().check_settings()
        s = self.settings
        clash = [name for name, on in (("scaffold=1", s.scaffold), ("fednova=1", s.fednova),
                                       (f"server-momentum={s.server_momentum}", s.server_momentum > 0),
                                       (f"aggregation={s.aggregation}", s.aggregation != "mean")) if on]
        if clash:
            raise ValueError(f"feddyn corrects the server's mean with its own state h: {', '.join(clash)} would change "
                             f"that mean; use scaffold=0, fednova=0, server-momentum=0 and aggregation=mean")

    def local_train(self, model: nn.Module, rows, global_state: State, *, seed: int, lr: float, steps: int,
                    kept_state: State | None, extras: State) -> LocalWork:
        alpha = self.settings.feddyn_alpha
        params = parameters_of(model)
        received = {k: v.detach().clone() for k, v in global_state.items()}
        kept = kept_state or {k: torch.zeros_like(v) for k, v in received.items()}
        pairs = [(params[k], kept[k].to(params[k].device), received[k].to(params[k].device)) for k in received]
        task = task_loss(self.settings, rows, task_spec(self.settings.task).num_labels)

        def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return task(model, batch) + regulariser(pairs, alpha)

        result = supervised_round(self.settings, model, rows, seed, lr, steps, loss, self.settings.client_optimizer)
        trained = {k: params[k].detach().cpu() for k in received}
        return LocalWork(result, client_state_update(kept, trained, received, alpha))

    def aggregate(self, states: list[State], weights: list[float]) -> State:
        """The unweighted mean of the round's states (the paper's), whatever `client-weighting` says."""
        self.clients_in_round = len(states)
        return robust_aggregate(states, [1.0] * len(states), "mean")

    def server_update(self, model: nn.Module, state: State, server_round: int,
                      previous: State) -> tuple[State, dict[str, float]]:
        h = self.h or {k: torch.zeros_like(v) for k, v in previous.items()}
        state, self.h = server_state_update(h, state, previous, self.clients_in_round, self.settings.clients,
                                            self.settings.feddyn_alpha)
        return state, {}

    def checkpoint_state(self) -> State:
        return {f"h.{k}": v for k, v in self.h.items()}

    def restore(self, state: State, model: nn.Module) -> None:
        self.h = {k[2:]: v for k, v in state.items() if k.startswith("h.")}
