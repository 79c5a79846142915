"""Classification metrics, and which one each task reports as primary."""

from __future__ import annotations

import numpy as np

from fedtune.tasks import task_spec


def classification_metrics(task: str, labels: np.ndarray, predictions: np.ndarray,
                           scores: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy for every task, and the task's own metrics (`TaskSpec.metrics`: Matthews
    correlation for CoLA, GLUE's CoLA metric). For label skew: balanced accuracy (the mean of the
    per-class recalls) and the worst class's recall, over the classes present in `labels` (a model
    that predicts one class for every row has balanced accuracy 1 / classes and worst recall 0).
    With `scores` (how strongly each row is predicted positive, e.g. logit 1 - logit 0), ROC-AUC too:
    threshold-free, so it still ranks models that all predict the majority class (MCC 0)."""
    from sklearn.metrics import accuracy_score, matthews_corrcoef, recall_score, roc_auc_score  # ~1 s to import

    metrics = {"accuracy": float(accuracy_score(labels, predictions))}
    if "mcc" in task_spec(task).metrics:
        metrics["mcc"] = float(matthews_corrcoef(labels, predictions))
    recalls = recall_score(labels, predictions, labels=np.unique(labels), average=None, zero_division=0)
    metrics["balanced_accuracy"] = float(np.mean(recalls))
    metrics["worst_class_recall"] = float(np.min(recalls))
    if scores is not None and len(np.unique(labels)) == 2:
        metrics["auc"] = float(roc_auc_score(labels, scores))
    return metrics


def primary_metric(task: str) -> str:
    """'mcc' for CoLA, 'accuracy' for SST-2."""
    return task_spec(task).primary_metric


def learned_nothing(dev: dict[str, float]) -> str | None:
    """Why final dev metrics are no result, or None: a model whose worst class has recall 0 never
    gets one of the classes right (for two classes: one label for every row, balanced accuracy
    .5), whatever its accuracy says. Metrics recorded before the recall was are not judged."""
    if dev.get("worst_class_recall") == 0.0:
        return (f"the model never predicts one of the classes correctly (worst-class recall 0, balanced accuracy "
                f"{dev.get('balanced_accuracy', float('nan')):.3f}): its accuracy {dev.get('accuracy', float('nan')):.3f} "
                f"is the other class's share, not something it learned")
    return None
