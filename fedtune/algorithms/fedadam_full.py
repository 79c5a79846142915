"""FedAdam on the whole model (Reddi et al., ICLR 2021): FedAvg's clients (every weight trains
and travels), then the server's Adam step on the averaged update (`fedadam.ServerAdam`: the same
maths, settings and checkpointed moments as `fedadam`). With one local step of plain SGD
(`local-steps 1 --client-optimizer sgd`) the mean update is an unbiased estimate of the gradient
over every client's rows, whatever the label skew, and the server runs Adam on it: FedSGD with
a server optimizer, the recipe `docs/label-skew.md` measures for LoRA."""

from __future__ import annotations

from fedtune.algorithms.base import register
from fedtune.algorithms.fedadam import ServerAdam
from fedtune.algorithms.fedavg import FedAvg


@register
class FedAdamFull(ServerAdam, FedAvg):
    name = "fedadam-full"
    summary = ("FedAvg's full fine-tuning + Adam on the server over the averaged update (as fedadam; give "
               "server-lr ~1e-4: the default 1e-2 is LoRA's and diverges here)")
    # Adam's step is about its learning rate per weight: full fine-tuning's rates (as full-lr's
    # grid), not LoRA's.
    tunables = {"server_lr": (3e-5, 1e-4, 3e-4)}
    rows = (("Fed-finetune (FedAdam)", {}),)
    card = {"what trains": "every weight; server takes an Adam step on the mean update",
            "up (client -> server)": "whole model", "down (server -> client)": "whole model",
            "aggregation exact": "no", "paper": "Reddi et al. 2021"}
