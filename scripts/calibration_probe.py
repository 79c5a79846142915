"""What limits classifier calibration on a finished grid cell: the features, or the classifier fit?

    python scripts/calibration_probe.py <out-dir>/compare/cells/<key>.json [--pretrained]

The cell's run folder (kept beside the cell by `fedtune compare`) must be there. Reads its
exported model, computes every client's per-class feature statistics as the clients of a
`classifier-calibration` run do, and scores on the cell's evaluation rows (for a tuning trial the
holdout of the private rows, never GLUE dev): the exported head; the closed-form discriminant
(`ccvr-lda`); CCVR's sampled-features fit again, from the exported head (for a `ccvr` run the
already calibrated one) with more samples, or from a zero head with more epochs; the
discriminant with its shared covariance shrunk toward a multiple of the identity (by OAS's
estimate, Chen et al. 2010, and fixed shares); FedNCM's head (Legate et al. 2023: the cosine to
each class's normalised mean feature); and, as an upper bound no federation has, a logistic
regression fitted on every client's real features. With `--pretrained` the cell's adapter is not
loaded: the same heads on the pre-trained model's features (what `classifier-init lda` starts from).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from fedtune import calibration
from fedtune.algorithms import get_algorithm
from fedtune.config import Settings
from fedtune.data import cached_task_data
from fedtune.local import cached_model
from fedtune.partition import client_partitions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cell", help="a cached cell (<out-dir>/compare/cells/<key>.json) of a LoRA row")
    parser.add_argument("--pretrained", action="store_true", help="the pre-trained model's features, not the run's")
    args = parser.parse_args()
    cell = json.load(open(args.cell))
    if not args.pretrained and not Path(f"{cell['run']}/model/adapter_model.safetensors").is_file():
        raise SystemExit(f"calibration_probe: {cell['run']}/model is not here (the cell's run folder is kept only "
                         "where the cell ran): run the cell again, or give --pretrained")
    settings = Settings.from_dict(cell["settings"])
    model = cached_model(get_algorithm(settings.algorithm, settings), settings)
    if not args.pretrained:
        set_peft_model_state_dict(model, load_file(f"{cell['run']}/model/adapter_model.safetensors"))
    data = cached_task_data(settings)
    stats, features, labels = [], [], []
    for rows in client_partitions(settings, settings.clients):
        f, y = calibration.features_of(model, data.private.select(rows), settings, 2)
        stats.append(calibration.class_statistics(f, y, 2))
        features.append(f)
        labels.append(y)
    eval_x, eval_y = (t.numpy() for t in calibration.features_of(model, data.validation, settings, 2))
    _, head = calibration.head_layer(model, 2)

    def report(name: str, scores: np.ndarray) -> None:
        predicted = (scores > 0).astype(int)
        print(f"| {name} | {np.mean(predicted == eval_y):.4f} | {balanced_accuracy_score(eval_y, predicted):.4f} | "
              f"{roc_auc_score(eval_y, scores):.4f} | {predicted.mean():.3f} |", flush=True)

    print(f"{'pre-trained model, ' if args.pretrained else ''}"
          f"{cell['label']} ({settings.partition} {settings.dirichlet_alpha}, lora-lr {settings.lora_lr}), "
          f"{len(eval_y)} evaluation rows\n\n| classifier | accuracy | balanced | AUC | predicted positive |\n"
          "|---|---:|---:|---:|---:|")
    with torch.no_grad():
        logits = head(torch.from_numpy(eval_x)).numpy()
    exported = f"the run's exported head ({settings.classifier_calibration})"
    report("the initial head (random)" if args.pretrained else exported, logits[:, 1] - logits[:, 0])
    pooled = calibration.pooled_statistics(stats)
    weight, bias = calibration.discriminant_head(pooled)
    lda = eval_x @ weight.numpy().T + bias.numpy()
    report("ccvr-lda: discriminant of the pooled statistics", lda[:, 1] - lda[:, 0])
    shared = pooled["covs"].mean(0)
    n, dim = float(pooled["counts"].sum()), shared.shape[0]
    mean_variance = float(shared.diagonal().mean())
    # OAS (Chen, Wiesel, Eldar and Hero 2010), as sklearn.covariance.oas computes it from a covariance
    alpha = float((shared ** 2).mean())
    oas = min(1.0, (alpha + mean_variance ** 2) / ((n + 1) * (alpha - mean_variance ** 2 / dim)))
    for share in (oas, 0.01, 0.1, 0.5):
        shrunk = (1 - share) * shared + share * mean_variance * torch.eye(dim, dtype=shared.dtype)
        w, b = calibration.discriminant_head({**pooled, "covs": shrunk.expand_as(pooled["covs"])}, ridge=0.0)
        out = eval_x @ w.numpy().T + b.numpy()
        report(f"discriminant, covariance shrunk {share:.2g} toward the identity{' (OAS)' if share == oas else ''}",
               out[:, 1] - out[:, 0])
    means = torch.nn.functional.normalize(pooled["means"].float(), dim=1).numpy()
    cosine = (eval_x / np.linalg.norm(eval_x, axis=1, keepdims=True)) @ means.T
    report("FedNCM: cosine to the normalised class means", cosine[:, 1] - cosine[:, 0])
    for samples, epochs, zero in ((2000, 5, False), (20000, 5, False), (20000, 20, True)):
        generator = torch.Generator().manual_seed(0)
        x, y = calibration.virtual_features(pooled, samples, generator)
        layer = torch.nn.Linear(eval_x.shape[1], 2)
        layer.load_state_dict(head.state_dict())
        if zero:
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
        loss = calibration.fit_head(layer, x, y, lr=settings.ccvr_lr, batch_size=settings.batch_size,
                                    generator=generator, epochs=epochs)
        with torch.no_grad():
            out = layer(torch.from_numpy(eval_x)).numpy()
        report(f"ccvr fit: {samples} per class, {epochs} epochs, from {'zero' if zero else 'the exported head'} "
               f"(loss {loss:.3f})", out[:, 1] - out[:, 0])
    oracle = LogisticRegression(max_iter=2000, class_weight="balanced")
    oracle.fit(torch.cat(features).numpy(), torch.cat(labels).numpy())
    report("upper bound: logistic regression on every client's real features", oracle.decision_function(eval_x))


if __name__ == "__main__":
    main()
