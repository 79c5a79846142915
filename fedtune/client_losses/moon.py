"""MOON (Li, He and Song, CVPR 2021, "Model-Contrastive Federated Learning"): under label skew a
client's local training pulls its representation away from the global model's. MOON adds to the
cross-entropy mu times a contrastive loss on each row's representation z (here the classifier's
input, as CCVR and FedDecorr read it; the paper's models have a projection head, ours do not):

    l_con = -log( exp(cos(z, z_glob) / tau) / (exp(cos(z, z_glob) / tau) + exp(cos(z, z_prev) / tau)) )

z_glob: the row under the model the client received this round (the positive), z_prev: under the
model this client trained in its last round (the negative). Both reference models run in eval
mode without autograd; only z carries gradient. The previous state stays on the client's own disk
(never sent, as SCAFFOLD's c_i), beside its other kept state. A client without a previous round
has no negative: the authors' code then has a single logit, whose cross-entropy is 0, so its
first round trains with the plain cross-entropy; so does fedtune's.

Defaults are the paper's: tau 0.5, mu 1 (its choice for CIFAR-100 and Tiny-ImageNet; 5 for CIFAR-10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedtune.client_losses.base import ClientLoss, register
from fedtune.plugins import Option


def model_contrastive_loss(z: torch.Tensor, z_global: torch.Tensor, z_previous: torch.Tensor | None,
                           tau: float) -> torch.Tensor:
    """Mean over rows of -log softmax([cos(z, z_glob), cos(z, z_prev)] / tau)[0]; 0 (with the
    graph kept) without a previous model, as a softmax over one logit."""
    if z_previous is None:
        return z.sum() * 0.0
    similarities = torch.stack([F.cosine_similarity(z, z_global, dim=-1),
                                F.cosine_similarity(z, z_previous, dim=-1)], dim=1) / tau
    return F.cross_entropy(similarities, torch.zeros(len(z), dtype=torch.long, device=z.device))


@register
class MOON(ClientLoss):
    name = "moon"
    summary = "MOON: cross-entropy + mu * contrast of each row's features to the global and last local model's (moon-mu, moon-tau)"
    options = {"moon_mu": Option(1.0, "weight mu of MOON's model-contrastive term (client-loss moon; the paper's 1)",
                                 interval="(0, inf)"),
               "moon_tau": Option(0.5, "temperature tau of MOON's model-contrastive term (client-loss moon; the "
                                  "paper's 0.5)", interval="(0, inf)")}
    reads_features = True
    reads_references = True

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor | None = None,
                 references: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        if features is None or references is None:
            raise ValueError("client-loss moon needs the classifier's input under this, the received and the "
                             "previous model")
        contrast = model_contrastive_loss(features, *references, self.settings.moon_tau)
        return F.cross_entropy(logits, labels) + self.settings.moon_mu * contrast
