"""FedLC (Zhang et al., ICML 2022, "Federated Learning with Label Distribution Skew via Logits
Calibration"): during local training each logit is shifted down by tau * n_c^(-1/4), n_c being
the client's rows of class c, so a client's rare classes are not pushed down as hard.

A class the client lacks (n_c = 0) takes the formula's limit: an infinite shift, so the class gets
probability 0 in the client's softmax and its logit gets no gradient (finite loss, no NaN). A
client with one class therefore has loss 0 and leaves the model unchanged: it holds no evidence
about the decision between classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedtune.client_losses.base import ClientLoss, register
from fedtune.plugins import Option


def calibrated_logits(logits: torch.Tensor, counts: torch.Tensor, tau: float) -> torch.Tensor:
    """logits - tau * counts^(-1/4) per class; -inf for a class with no rows."""
    shift = tau * counts.clamp_min(1.0).pow(-0.25)
    return torch.where(counts > 0, logits - shift, torch.full_like(logits, float("-inf")))


def fedlc_loss(logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean cross-entropy of the calibrated logits (labels are always classes the client has)."""
    return F.cross_entropy(calibrated_logits(logits, counts.to(logits.device), tau), labels)


@register
class FedLC(ClientLoss):
    name = "fedlc"
    summary = "FedLC logit calibration: logits - tau * n_c^(-1/4) from the client's label counts (fedlc-tau)"
    options = {"fedlc_tau": Option(1.0, "calibration strength tau of FedLC (client-loss fedlc)", interval="(0, inf)")}

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return fedlc_loss(logits, labels, self.counts, self.settings.fedlc_tau)
