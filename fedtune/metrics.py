"""Classification metrics, and which one each task reports as primary."""

from __future__ import annotations

import numpy as np

from fedtune.tasks import task_spec


def classification_metrics(task: str, labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Accuracy for every task; Matthews correlation too for CoLA (GLUE's CoLA metric)."""
    from sklearn.metrics import accuracy_score, matthews_corrcoef  # ~1 s to import: only when evaluating
    metrics = {"accuracy": float(accuracy_score(labels, predictions))}
    if task == "cola":
        metrics["mcc"] = float(matthews_corrcoef(labels, predictions))
    return metrics


def primary_metric(task: str) -> str:
    """'mcc' for CoLA, 'accuracy' for SST-2."""
    return task_spec(task).primary_metric
