"""CCVR: classifier calibration with virtual representations (Luo et al., NeurIPS 2021).

Under label skew the classifier is the most biased part of a federated model (the paper's
finding); CCVR retrains it after the last round, with no data on the server:

1. each client runs the final global model over its own rows and sends, per class c, its row
   count n_c, the mean and the (unbiased) covariance of the features the classifier reads;
2. the server pools them into each class's global mean and covariance (the paper's eq. 4, exact:
   it equals the statistics of all clients' rows together), draws `ccvr-samples` virtual features
   per class from N(mean_c, cov_c) and retrains the classifier on them (cross-entropy, AdamW,
   `ccvr-lr`, 5 epochs, from its current weights); every other weight stays as trained.

`ccvr-lda` uses the same statistics but sets the classifier in closed form to the linear
discriminant of the pooled Gaussians (`discriminant_head`: the class covariances' mean as the shared
covariance, equal class priors, as CCVR's balanced virtual features): the classifier that CCVR's
sampling and SGD approximate when the classes share a covariance, with no sampling noise and no
learning rate (a diagnostic on Fed-LoRA at Dirichlet 0.1 found the SGD fit, not the features, to
be what limited CCVR there: docs/label-skew.md).

The pure maths is `class_statistics`, `pooled_statistics`, `virtual_features`, `fit_head` and
`discriminant_head`; the
client and server halves below wire them to fedtune's models and data. What a client sends
(class means and covariances of its features) says more about its data than a model update, so
the calibration is refused with DP and SecAgg+, whose guarantees it would bypass.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtune.config import Settings
from fedtune.data import cached_task_data, eval_loader, tokenize
from fedtune.devices import model_device, to_device
from fedtune.models import State, classifier_layer, load_tokenizer, load_trainable_state, trainable_state
from fedtune.partition import client_partitions

ACTION = "class_stats"  # the query a client answers with its statistics (message type "query.class_stats")
EPOCHS = 5  # passes over the virtual features when the classifier is retrained


# ---- the maths -------------------------------------------------------------------------------
def class_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> State:
    """Per class: row count, feature mean, unbiased feature covariance (zeros where a class has
    fewer than two rows). `features` (N, D), `labels` (N,)."""
    features = features.double()
    dim = features.shape[1]
    counts = torch.zeros(num_classes, dtype=torch.float64)
    means = torch.zeros(num_classes, dim, dtype=torch.float64)
    covs = torch.zeros(num_classes, dim, dim, dtype=torch.float64)
    for c in range(num_classes):
        rows = features[labels == c]
        counts[c] = len(rows)
        if len(rows):
            means[c] = rows.mean(0)
        if len(rows) > 1:
            covs[c] = torch.cov(rows.T, correction=1)
    return {"counts": counts, "means": means, "covs": covs}


def pooled_statistics(stats: list[State]) -> State:
    """The clients' per-class statistics pooled into global ones (CCVR eq. 4):
    mean_c = sum_k n_ck mean_ck / n_c and
    cov_c = sum_k (n_ck - 1)/(n_c - 1) cov_ck + sum_k n_ck/(n_c - 1) mean_ck mean_ck^T - n_c/(n_c - 1) mean_c mean_c^T,
    i.e. exactly the mean and unbiased covariance of all clients' rows of class c together."""
    counts = torch.stack([s["counts"].double() for s in stats])  # (K, C)
    means = torch.stack([s["means"].double() for s in stats])  # (K, C, D)
    covs = torch.stack([s["covs"].double() for s in stats])  # (K, C, D, D)
    total = counts.sum(0)  # (C,)
    mean = (counts[..., None] * means).sum(0) / total.clamp_min(1)[:, None]
    second = ((counts - 1).clamp_min(0)[..., None, None] * covs
              + counts[..., None, None] * means[..., :, None] * means[..., None, :]).sum(0)
    cov = (second - total[:, None, None] * mean[:, :, None] * mean[:, None, :]) / (total - 1).clamp_min(1)[:, None, None]
    cov[total < 2] = 0.0
    return {"counts": total, "means": mean, "covs": cov}


def virtual_features(pooled: State, per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` draws from N(mean_c, cov_c) for every class some client holds (none for a class
    no client holds): (features (M, D) float32, labels (M,)). A singular covariance (fewer rows
    than dimensions, saturated features) gets the smallest diagonal jitter that factorizes."""
    xs, ys = [], []
    for c in range(len(pooled["counts"])):
        if pooled["counts"][c] < 1:
            continue
        mean, cov = pooled["means"][c], pooled["covs"][c]
        eye = torch.eye(len(mean), dtype=cov.dtype)
        scale = float(cov.diagonal().mean().clamp_min(1e-12))
        for jitter in (0.0, 1e-8, 1e-6, 1e-4, 1e-2):
            factor, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
            if info == 0:
                break
        else:
            raise ValueError(f"class {c}'s pooled feature covariance is not positive semi-definite")
        noise = torch.randn(per_class, len(mean), generator=generator, dtype=torch.float64)
        xs.append((mean + noise @ factor.T).float())
        ys.append(torch.full((per_class,), c, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def fit_head(layer: nn.Linear, features: torch.Tensor, labels: torch.Tensor, *, lr: float, batch_size: int,
             generator: torch.Generator, epochs: int = EPOCHS) -> float:
    """Retrain `layer` (the classifier) on `features` with cross-entropy, from its current weights;
    the mean loss of the last epoch."""
    device = layer.weight.device
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=0.0)
    last = 0.0
    with torch.enable_grad():
        for _ in range(epochs):
            order, total = torch.randperm(len(labels), generator=generator), 0.0
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                loss = nn.functional.cross_entropy(layer(features[rows].to(device)), labels[rows].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(rows)
            last = total / len(labels)
    return last


def discriminant_head(pooled: State, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, D), bias (C,)) of the linear discriminant of the pooled class Gaussians with a
    shared covariance S (the mean of the class covariances) and equal priors:
    logit_c = mu_c^T S^-1 x - mu_c^T S^-1 mu_c / 2 (less the mean over classes), so logit_a - logit_b
    is the log-ratio of the two Gaussian densities. `ridge` times S's mean variance is added to its
    diagonal (S is singular when a class has fewer rows than features)."""
    counts, means, covs = pooled["counts"].double(), pooled["means"].double(), pooled["covs"].double()
    if missing := [c for c in range(len(counts)) if counts[c] < 1]:
        raise ValueError(f"classifier-calibration=ccvr-lda: no client holds class(es) {missing}, so the "
                         f"discriminant has nothing to place them by; use classifier-calibration=ccvr")
    shared = covs.mean(0)
    shared = shared + ridge * float(shared.diagonal().mean().clamp_min(1e-12)) * torch.eye(len(shared), dtype=shared.dtype)
    weight = torch.linalg.solve(shared, means.T).T  # row c: S^-1 mu_c
    bias = -0.5 * (weight * means).sum(1)
    # The softmax ignores what all logits share: removing the rows' mean keeps every logit difference
    # and drops the large common part (S^-1 times the classes' shared mean, large along S's small
    # eigenvalues), which in a float32 head would cancel catastrophically.
    return weight - weight.mean(0), bias - bias.mean()


def head_layer(model: nn.Module, num_labels: int) -> tuple[str, nn.Linear]:
    """The classifier CCVR retrains (`models.classifier_layer`: BERT's `classifier`, Llama's `score`,
    peft's trainable copy of either), or one clear error."""
    if (found := classifier_layer(model, num_labels)) is None:
        raise ValueError(f"classifier-calibration: the model has no trainable linear layer with {num_labels} outputs "
                         f"to calibrate; use classifier-calibration=none")
    return found


def check_model(model: nn.Module, settings: Settings, num_labels: int) -> nn.Linear:
    """The classifier the calibration will set, or one clear error (run before round 1)."""
    _, layer = head_layer(model, num_labels)
    if settings.classifier_calibration == "ccvr-lda" and layer.bias is None:
        raise ValueError("classifier-calibration=ccvr-lda needs a classifier with a bias (this model's has none, "
                         "e.g. a decoder's `score`); use classifier-calibration=ccvr")
    if settings.classifier_init == "lda" and layer.bias is None:
        raise ValueError("classifier-init=lda needs a classifier with a bias (this model's has none, e.g. a "
                         "decoder's `score`); use classifier-init=none")
    return layer


# ---- a client's half ---------------------------------------------------------------------------
def pooled(head_input: torch.Tensor, input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """The classifier's input of each row (B, D): `head_input` itself when the head reads one vector
    a row (BERT's pooled output), else (a decoder's `score`, (B, T, D)) the position whose logits
    the model keeps, the last non-pad token (as transformers pools)."""
    if head_input.dim() == 2:
        return head_input
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = ((input_ids != pad_token_id).long() * positions).argmax(-1)
    return head_input[torch.arange(len(head_input), device=head_input.device), last]


@torch.inference_mode()
def features_of(model: nn.Module, rows, settings: Settings, num_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features the classifier reads, labels) of `rows`, the model in eval mode, fp32: the input
    of `head_layer`; where the head reads every position (a decoder's `score`), the position whose
    logits the model keeps, its last non-pad token (as transformers pools)."""
    _, layer = head_layer(model, num_labels)
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].float().cpu()))
    tokenizer = load_tokenizer(settings.input_model)
    features, labels = [], []
    model.eval()
    try:
        for batch in eval_loader(tokenize(rows, tokenizer, settings.max_length), tokenizer, settings.eval_batch_size):
            captured.clear()
            model(**to_device({k: v for k, v in batch.items() if k != "labels"}, model_device(model)))
            features.append(pooled(captured[-1], batch["input_ids"], model.config.pad_token_id))
            labels.append(batch["labels"])
    finally:
        hook.remove()
    return torch.cat(features), torch.cat(labels)


def client_statistics(model: nn.Module, state: State, settings: Settings, partition_id: int,
                      num_partitions: int, num_labels: int) -> State:
    """What a client sends for CCVR: its rows' per-class count, feature mean and covariance under
    the global `state` (loaded into `model`, the server's architecture), float32."""
    load_trainable_state(model, state)
    rows = cached_task_data(settings).private.select(client_partitions(settings, num_partitions)[partition_id])
    features, labels = features_of(model, rows, settings, num_labels)
    return {k: v.float() for k, v in class_statistics(features, labels, num_labels).items()}


# ---- the server's half ---------------------------------------------------------------------------
def calibrate(model: nn.Module, state: State, stats: list[State], settings: Settings,
              num_labels: int, method: str = "") -> tuple[State, dict[str, float]]:
    """The global `state` with its classifier retrained on virtual features drawn from the
    clients' pooled `stats` (`method` ccvr), or set to their discriminant (ccvr-lda); every other
    tensor unchanged. `method` defaults to `classifier-calibration`. Returns (state, metrics)."""
    method = method or settings.classifier_calibration
    load_trainable_state(model, state)
    pooled = pooled_statistics(stats)
    layer = check_model(model, settings, num_labels)
    if method == "ccvr-lda":
        weight, bias = discriminant_head(pooled)
        with torch.no_grad():
            layer.weight.copy_(weight.to(layer.weight))
            layer.bias.copy_(bias.to(layer.bias))
        return trainable_state(model), {"ccvr_classes": int((pooled["counts"] > 0).sum())}
    generator = torch.Generator().manual_seed(settings.seed)
    features, labels = virtual_features(pooled, settings.ccvr_samples, generator)
    loss = fit_head(layer, features, labels, lr=settings.ccvr_lr, batch_size=settings.batch_size, generator=generator)
    return trainable_state(model), {"ccvr_loss": loss, "ccvr_classes": int((pooled["counts"] > 0).sum())}


# ---- on the wire -----------------------------------------------------------------------------
TRIANGLE = "covs_triangle"  # `ccvr-covariance triangle`: each class's upper triangle, row by row


def pack_statistics(stats: State, covariance: str) -> State:
    """What a client sends: `stats` as they are (`covariance` "full"), or with each class's
    covariance as its upper triangle with the diagonal ("triangle": (C, D(D+1)/2), half the bytes;
    a covariance is symmetric, so nothing is lost)."""
    if covariance == "full":
        return stats
    rows, cols = torch.triu_indices(*stats["covs"].shape[1:])
    return {"counts": stats["counts"], "means": stats["means"], TRIANGLE: stats["covs"][:, rows, cols]}


def unpack_statistics(sent: State, dim: int) -> State:
    """The statistics `pack_statistics` sent, with full (C, D, D) covariances (a triangle mirrored)."""
    if TRIANGLE not in sent:
        return sent
    triangle = sent[TRIANGLE]
    rows, cols = torch.triu_indices(dim, dim)
    covs = triangle.new_zeros(triangle.shape[0], dim, dim)
    covs[:, rows, cols] = triangle
    covs[:, cols, rows] = triangle
    return {"counts": sent["counts"], "means": sent["means"], "covs": covs}


def check_statistics(stats: State, num_labels: int, dim: int) -> str | None:
    """Why a client's statistics, as sent (`pack_statistics`), cannot be pooled (wrong keys, shapes,
    non-finite values, negative counts), or None."""
    covariances = ({TRIANGLE: (num_labels, dim * (dim + 1) // 2)} if TRIANGLE in stats
                   else {"covs": (num_labels, dim, dim)})
    shapes = {"counts": (num_labels,), "means": (num_labels, dim), **covariances}
    if set(stats) != set(shapes):
        return f"class statistics with keys {sorted(stats)}, expected {sorted(shapes)}"
    for key, shape in shapes.items():
        if tuple(stats[key].shape) != shape:
            return f"class statistics {key} of shape {tuple(stats[key].shape)}, expected {shape}"
        if not torch.isfinite(stats[key]).all():
            return f"class statistics {key} hold NaN or inf"
    if (stats["counts"] < 0).any():
        return "class statistics with a negative count"
    return None
