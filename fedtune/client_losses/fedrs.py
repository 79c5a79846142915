"""FedRS (Li and Zhan, KDD 2021, "FedRS: Federated Learning with Restricted Softmax for Label
Distribution Non-IID Data"): during local training each class's logit is scaled by
alpha + (1 - alpha) * n_c / max_c' n_c', so a class the client lacks (n_c = 0) enters its softmax
at alpha times its logit and its classifier row is pushed away less hard than by plain
cross-entropy ("restricted softmax"; the authors' code scales by the client's class shares this way).

Unlike FedLC and logit adjustment, a class the client lacks keeps a finite logit and a gradient
(scaled by alpha), so a one-class client still trains: alpha 1 is plain cross-entropy; at alpha 0
the missing class's logit is held at 0, and the client's own classes are pushed above 0.

The authors' classifier loss reads the weight term w_c . h without the bias; here the head's whole
logit (bias included) is scaled, so the loss needs nothing but the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedtune.client_losses.base import ClientLoss, register
from fedtune.plugins import Option


def restriction(counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Each class's logit scale: alpha + (1 - alpha) * counts / max(counts), in [alpha, 1]."""
    return alpha + (1.0 - alpha) * counts / counts.max().clamp_min(1.0)


def restricted_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor,
                            alpha: float) -> torch.Tensor:
    """Mean cross-entropy of the logits scaled per class by `restriction`."""
    return F.cross_entropy(logits * restriction(counts.to(logits.device), alpha), labels)


@register
class FedRS(ClientLoss):
    name = "fedrs"
    summary = "FedRS restricted softmax: each class's logit scaled by alpha + (1-alpha) n_c / max n (fedrs-alpha)"
    options = {"fedrs_alpha": Option(0.5, "scale of a missing class's logit in FedRS's restricted softmax "
                                          "(client-loss fedrs; 1: plain cross-entropy)", interval="[0, 1]")}

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return restricted_softmax_loss(logits, labels, self.counts, self.settings.fedrs_alpha)
