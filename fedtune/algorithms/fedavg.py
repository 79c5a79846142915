"""FedAvg: every weight trains and the whole model travels (McMahan et al. 2017)."""

from __future__ import annotations

from torch import nn

from fedtune.algorithms.base import Algorithm, register
from fedtune.config import Settings
from fedtune.data import task_spec
from fedtune.models import load_classifier


@register
class FedAvg(Algorithm):
    name = "fedavg"
    summary = "full fine-tuning; the whole model travels, averaged by examples"
    rows = (("Fed-finetune (FedAvg)", {}),)
    card = {"what trains": "every weight", "up (client -> server)": "whole model",
            "down (server -> client)": "whole model", "aggregation exact": "yes (weighted mean)",
            "paper": "McMahan et al. 2017"}
    lr_setting = "full_lr"
    batchable = False  # every weight trains: there is no frozen base for batched clients to share

    def build_model(self, settings: Settings) -> nn.Module:
        spec = task_spec(settings.task)
        return load_classifier(settings.model, spec.num_labels, settings.seed, settings.model_dropout, spec.labels)
