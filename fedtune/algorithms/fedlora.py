"""FedLoRA: the base stays frozen; only LoRA A/B and the classification head travel."""

from __future__ import annotations

from torch import nn

from fedtune.algorithms.base import Algorithm, register
from fedtune.config import Settings
from fedtune.data import task_spec
from fedtune.models import add_lora, load_classifier


@register
class FedLoRA(Algorithm):
    name = "fedlora"
    summary = "LoRA adapters + head travel, averaged by examples (A and B averaged separately)"
    rows = (("Fed-LoRA", {}),)
    card = {"what trains": "LoRA A, B + head", "up (client -> server)": "A, B, head",
            "down (server -> client)": "A, B, head", "aggregation exact": "no: mean(B)·mean(A)",
            "own rank per client": "no", "paper": "FedIT-style FedLoRA"}

    def build_model(self, settings: Settings) -> nn.Module:
        spec = task_spec(settings.task)
        model = load_classifier(settings.model, spec.num_labels, settings.seed, settings.model_dropout, spec.labels)
        return add_lora(model, settings.lora_r, settings.lora_alpha, settings.lora_dropout, settings.lora_targets)

    def summary_fields(self) -> dict:
        return {"lora_r": self.server_settings().lora_r, "client_ranks": None}
