"""FedDecorr (Shi et al., ICLR 2023, "Towards Understanding and Mitigating Dimensional Collapse in
Heterogeneous Federated Learning"): under label skew a client's features collapse into a few
directions (a one-class client needs only one), and the averaged model inherits the collapse.
FedDecorr adds to each client's cross-entropy beta times the mean squared off-diagonal entry of
the correlation matrix of its batch's features (the classifier's input), divided by the batch size
(the authors' code, FedCLS), which spreads them over more directions.

It reads only the client's batch: nothing about the client's labels is used, and a one-class client
still has a loss whose gradient reaches the body. A batch of one row (no correlation) adds 0;
a feature constant over the batch is z-normalised with eps 1e-8 and adds nothing either (no NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedtune.client_losses.base import ClientLoss, register
from fedtune.plugins import Option

EPS = 1e-8  # in the feature variance's square root, as the authors' code


def decorrelation_loss(features: torch.Tensor) -> torch.Tensor:
    """mean over i != j of corr_ij^2, / N, where corr = Z^T Z of the batch's z-normalised features
    Z (N, D) (per feature: minus its batch mean, over sqrt(eps + unbiased variance)); 0 for N = 1."""
    n = features.shape[0]
    if n < 2:
        return features.sum() * 0.0  # keeps the graph (and the dtype) for backward
    z = features - features.mean(0, keepdim=True)
    z = z / torch.sqrt(EPS + z.var(0, keepdim=True))
    corr = z.T @ z
    off_diagonal = corr[~torch.eye(len(corr), dtype=torch.bool, device=corr.device)]
    return off_diagonal.pow(2).mean() / n


@register
class FedDecorr(ClientLoss):
    name = "feddecorr"
    summary = "FedDecorr: cross-entropy + beta * squared correlations of the batch's features (feddecorr-beta)"
    options = {"feddecorr_beta": Option(0.1, "weight beta of FedDecorr's decorrelation term (client-loss feddecorr; "
                                        "the paper's 0.1)", interval="(0, inf)")}
    reads_features = True

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor,
                 features: torch.Tensor | None = None) -> torch.Tensor:
        if features is None:
            raise ValueError("client-loss feddecorr needs the classifier's input features")
        return F.cross_entropy(logits, labels) + self.settings.feddecorr_beta * decorrelation_loss(features)
