"""Logit-adjusted loss (Menon et al., ICLR 2021, "Long-tail learning via logit adjustment"):
cross-entropy of logits + tau * log(prior_c), the prior being the client's own label shares.
At tau = 1 this is the balanced softmax (Ren et al., NeurIPS 2020: logits + log n_c; the two
differ by log sum n, which softmax ignores).

A class the client lacks has prior 0: log 0 = -inf, so, as in FedLC, it drops out of the client's
softmax with no gradient, and a one-class client leaves the model unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedtune.client_losses.base import ClientLoss, register
from fedtune.plugins import Option


def adjusted_logits(logits: torch.Tensor, counts: torch.Tensor, tau: float) -> torch.Tensor:
    """logits + tau * log(counts / sum(counts)); -inf for a class with no rows."""
    log_prior = torch.log(counts.clamp_min(1.0) / counts.sum())
    return torch.where(counts > 0, logits + tau * log_prior, torch.full_like(logits, float("-inf")))


def logit_adjusted_loss(logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor,
                        tau: float) -> torch.Tensor:
    return F.cross_entropy(adjusted_logits(logits, counts.to(logits.device), tau), labels)


@register
class LogitAdjustment(ClientLoss):
    name = "logit-adjust"
    summary = "logit-adjusted cross-entropy, logits + tau * log(client prior) (la-tau; 1 = balanced softmax)"
    options = {"la_tau": Option(1.0, "scale tau of the log prior (client-loss logit-adjust; 1: balanced softmax)",
                                interval="(0, inf)")}

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logit_adjusted_loss(logits, labels, self.counts, self.settings.la_tau)
