"""The GLUE tasks fedtune knows: names, folders, labels and primary metric (no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.config import TASKS


@dataclass(frozen=True)
class TaskSpec:
    name: str
    folder: str  # folder name in the GLUE layout
    hub_config: str  # config name of `nyu-mll/glue` on the HF hub
    num_labels: int
    primary_metric: str
    labels: tuple[str, ...]  # label names, by label id
    metrics: tuple[str, ...] = ()  # what it reports besides accuracy (and ROC-AUC, balanced accuracy)


TASK_SPECS = {
    "cola": TaskSpec("cola", "CoLA", "cola", 2, "mcc", ("unacceptable", "acceptable"), ("mcc",)),
    "sst2": TaskSpec("sst2", "SST-2", "sst2", 2, "accuracy", ("negative", "positive")),
}


def task_spec(task: str) -> TaskSpec:
    if task not in TASK_SPECS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    return TASK_SPECS[task]
