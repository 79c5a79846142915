"""FedAdam (Reddi et al., ICLR 2021, "Adaptive Federated Optimization"): FedLoRA's clients; the
server treats the averaged update as a pseudo-gradient and takes an Adam step on the global
LoRA state (`ServerAdam`, which `fedadam-full` puts on FedAvg's whole model) with its own
learning rate (`server-lr`, decayed over rounds by `server-lr-schedule`, `server-beta1`,
`server-beta2`, `server-tau`). The step is `aggregate.fedadam_step` with Flower's
bias correction (exponent t + 1), so the results equal Flower's `FedAdam` strategy (tested against
it)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedtune.algorithms.aggregate import State, fedadam_step
from fedtune.algorithms.base import register
from fedtune.algorithms.fedlora import FedLoRA
from fedtune.config import Settings
from fedtune.plugins import Option
from fedtune.train import schedule_factor


class ServerAdam:
    """Adam on the server over the averaged update, for an algorithm whose clients send one shape:
    put it before the algorithm it extends (`class FedAdam(ServerAdam, FedLoRA)`)."""

    options = {"server_lr": Option(0.01, "server learning rate (eta) of Adam on the aggregated update",
                                   interval="(0, inf)"),
               "server_lr_schedule": Option("constant", "decay of server-lr over rounds (as lr-schedule does the "
                                            "clients'); constant is Flower's FedAdam",
                                            choices=("constant", "linear", "cosine")),
               "server_beta1": Option(0.9, "first-moment decay (beta_1)", interval="[0, 1)"),
               "server_beta2": Option(0.99, "second-moment decay (beta_2)", interval="[0, 1)"),
               "server_tau": Option(1e-3, "adaptivity tau (added to the root of the second moment)",
                                    interval="(0, inf)")}
    bias_correction = "flower"  # see aggregate.fedadam_step

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def check_settings(self) -> None:
        super().check_settings()
        if self.settings.server_momentum > 0:
            raise ValueError(f"{self.name} is its own server optimizer (Adam on the mean update): server-momentum="
                             f"{self.settings.server_momentum} would step twice; use server-momentum=0 (or the "
                             f"algorithm without server Adam, with server-momentum, for FedAvgM)")

    def server_update(self, model: nn.Module, state: State, server_round: int,
                      previous: State) -> tuple[State, dict[str, float]]:
        s = self.settings
        eta = s.server_lr * schedule_factor(s.server_lr_schedule, (server_round - 1) / s.rounds)
        stepped, self.m, self.v = fedadam_step(
            {k: t.numpy() for k, t in previous.items()}, {k: t.numpy() for k, t in state.items()}, self.m, self.v,
            server_round, eta, s.server_beta1, s.server_beta2, s.server_tau, self.bias_correction)
        return {k: torch.from_numpy(np.array(a)).to(state[k].dtype) for k, a in stepped.items()}, {}

    def checkpoint_state(self) -> State:
        moments = {"m": self.m, "v": self.v}
        return {f"{which}.{k}": torch.from_numpy(np.array(v)) for which, d in moments.items() for k, v in d.items()}

    def restore(self, state: State, model: nn.Module) -> None:
        self.m = {k[2:]: v.numpy() for k, v in state.items() if k.startswith("m.")}
        self.v = {k[2:]: v.numpy() for k, v in state.items() if k.startswith("v.")}


@register
class FedAdam(ServerAdam, FedLoRA):
    name = "fedadam"
    summary = "FedLoRA + Adam on the server over the averaged update (server-lr; Flower's FedAdam maths)"
    tunables = {"server_lr": (3e-3, 1e-2, 3e-2)}
    rows = (("FedAdam", {}),)
    card = {"what trains": "LoRA A, B + head; server takes an Adam step on the mean update",
            "up (client -> server)": "as fedlora", "down (server -> client)": "as fedlora",
            "aggregation exact": "no", "own rank per client": "no", "paper": "Reddi et al. 2021"}
