"""Client losses against label skew, one module each, found by name (`--client-loss`)."""

from fedtune.client_losses.base import (ClientLoss, client_loss_reads_features, client_loss_reads_references,
                                        label_counts, logit_loss, losses_on_logits, reference_states, register,
                                        registered, task_loss)
from fedtune.client_losses import fedlc, logit_adjustment, fedrs, feddecorr, moon  # noqa: F401, I001  (importing registers them)

__all__ = ["ClientLoss", "client_loss_reads_features", "client_loss_reads_references", "label_counts",
           "logit_loss", "losses_on_logits", "reference_states", "register", "registered", "task_loss"]
