"""Classification metrics, and which one each task reports as primary."""

from __future__ import annotations

import numpy as np

from fedtune.tasks import task_spec


def classification_metrics(task: str, labels: np.ndarray, predictions: np.ndarray,
                           scores: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy for every task; Matthews correlation too for CoLA (GLUE's CoLA metric). With
    `scores` (how strongly each row is predicted positive, e.g. logit 1 - logit 0), ROC-AUC too:
    threshold-free, so it still ranks models that all predict the majority class (MCC 0)."""
    from sklearn.metrics import accuracy_score, matthews_corrcoef, roc_auc_score  # ~1 s to import
    metrics = {"accuracy": float(accuracy_score(labels, predictions))}
    if task == "cola":
        metrics["mcc"] = float(matthews_corrcoef(labels, predictions))
    if scores is not None and len(np.unique(labels)) == 2:
        metrics["auc"] = float(roc_auc_score(labels, scores))
    return metrics


def primary_metric(task: str) -> str:
    """'mcc' for CoLA, 'accuracy' for SST-2."""
    return task_spec(task).primary_metric
