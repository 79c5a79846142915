"""FFA-LoRA (Sun et al., ICLR 2024, "Improving LoRA in Privacy-preserving Federated Learning"):
LoRA's A stays frozen at its seeded random initialisation, the same on every client (every
process builds it from the same seed); only B and the head train and travel. With A shared,
averaging B averages the clients' updates B_k·A exactly, and half of LoRA's bytes stay home."""

from __future__ import annotations

from torch import nn

from fedtune.algorithms.base import register
from fedtune.algorithms.fedlora import FedLoRA
from fedtune.algorithms.lora_maths import lora_key
from fedtune.config import Settings


@register
class FFALoRA(FedLoRA):
    name = "ffa-lora"
    summary = "LoRA A frozen at a shared seeded init; B + head train and travel; averaging is exact"
    rows = (("FFA-LoRA", {}),)
    card = {"what trains": "LoRA B + head (A frozen, shared seeded init)", "up (client -> server)": "B, head",
            "down (server -> client)": "B, head", "aggregation exact": "yes", "own rank per client": "no",
            "paper": "Sun et al. 2024"}

    def build_model(self, settings: Settings) -> nn.Module:
        model = super().build_model(settings)
        for name, parameter in model.named_parameters():
            if (parsed := lora_key(name)) and parsed[1] == "A":
                parameter.requires_grad_(False)  # not trained, so not sent (what travels is what trains)
        return model

    def summary_fields(self) -> dict:
        return {**super().summary_fields(), "frozen": "LoRA A (seeded random init, identical on every client)"}
