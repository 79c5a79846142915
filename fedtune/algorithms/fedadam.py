"""FedAdam (Reddi et al., ICLR 2021, "Adaptive Federated Optimization"): FedLoRA's clients; the
server treats the averaged update as a pseudo-gradient and takes an Adam step on the global
LoRA state with its own learning rate (`server-lr`, `server-beta1`, `server-beta2`,
`server-tau`). The Adam maths are Flower's own (`flwr.serverapp.strategy.FedAdam`), fed the
averaged state instead of client replies."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam as FlowerFedAdam
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedtune.algorithms.aggregate import State
from fedtune.algorithms.base import register
from fedtune.algorithms.fedlora import FedLoRA
from fedtune.config import Settings
from fedtune.plugins import Option


class _Averaged(FlowerFedAvg):
    """Stands in for Flower's FedAvg averaging under FedAdam: the replies it is given are the
    already averaged state (fedtune's strategy averaged and checked them)."""

    def aggregate_train(self, server_round, replies):  # noqa: D102
        return replies, None


class ServerAdam(FlowerFedAdam, _Averaged):
    """Flower's FedAdam step (`aggregate_train`) applied to an averaged ArrayRecord."""


@register
class FedAdam(FedLoRA):
    name = "fedadam"
    summary = "FedLoRA + Adam on the server over the averaged update (server-lr; Flower's FedAdam maths)"
    tunables = {"server_lr": (3e-3, 1e-2, 3e-2)}
    options = {"server_lr": Option(0.01, "server learning rate (eta) of Adam on the aggregated update",
                                   interval="(0, inf)"),
               "server_beta1": Option(0.9, "first-moment decay (beta_1)", interval="[0, 1)"),
               "server_beta2": Option(0.99, "second-moment decay (beta_2)", interval="[0, 1)"),
               "server_tau": Option(1e-3, "adaptivity tau (added to the root of the second moment)",
                                    interval="(0, inf)")}
    rows = (("FedAdam", {}),)
    card = {"what trains": "LoRA A, B + head; server takes an Adam step on the mean update",
            "up (client -> server)": "as fedlora", "down (server -> client)": "as fedlora",
            "aggregation exact": "no", "own rank per client": "no", "paper": "Reddi et al. 2021"}

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.optimizer = ServerAdam(eta=settings.server_lr, eta_l=settings.lora_lr, beta_1=settings.server_beta1,
                                    beta_2=settings.server_beta2, tau=settings.server_tau)

    def server_update(self, state: State, server_round: int, previous: State) -> tuple[State, dict[str, float]]:
        self.optimizer.current_arrays = {k: v.numpy() for k, v in previous.items()}
        averaged = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
        stepped, _ = self.optimizer.aggregate_train(server_round, averaged)
        return {k: torch.from_numpy(np.array(a.numpy())).to(state[k].dtype) for k, a in stepped.items()}, {}

    def checkpoint_state(self) -> State:
        moments = {"m": self.optimizer.m_t or {}, "v": self.optimizer.v_t or {}}
        return {f"{which}.{k}": torch.from_numpy(np.array(v)) for which, d in moments.items() for k, v in d.items()}

    def restore(self, state: State) -> None:
        for which in ("m", "v"):
            moments = {k[2:]: v.numpy() for k, v in state.items() if k.startswith(f"{which}.")}
            setattr(self.optimizer, f"{which}_t", moments or None)
