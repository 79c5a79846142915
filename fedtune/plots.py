"""PNG plots of a run: metric vs round and vs cumulative MB; partition label histograms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedtune.metrics import primary_metric  # noqa: E402


def plot_rounds(records: list[dict], task: str, path: Path) -> None:
    """Dev metric against round and against cumulative MB (up + down, log scale)."""
    metric = primary_metric(task)
    rounds = [r["round"] for r in records]
    values = [r[f"dev_{metric}"] for r in records]
    megabytes = [(r["cum_bytes_up"] + r["cum_bytes_down"]) / 1e6 for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(rounds, values, marker="o")
    left.set(xlabel="round", ylabel=f"dev {metric}", title=f"{task}: {metric} per round")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.plot(megabytes[1:], values[1:], marker="o")  # round 0 has sent nothing
    right.set(xlabel="cumulative MB sent (up + down)", ylabel=f"dev {metric}", title="metric vs communication")
    if len(megabytes) > 1 and min(megabytes[1:]) > 0:
        right.set_xscale("log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_partitions(partitions: list[dict], path: Path) -> None:
    """Stacked label counts per client."""
    labels = sorted({label for p in partitions for label in p["labels"]})
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(partitions) + 2), 3.5))
    bottom = [0] * len(partitions)
    for label in labels:
        counts = [p["labels"].get(label, 0) for p in partitions]
        ax.bar([p["partition-id"] for p in partitions], counts, bottom=bottom, label=f"label {label}")
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set(xlabel="client (partition id)", ylabel="rows", title="rows per client by label")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
