"""PNG plots of a run: metric vs round and vs cumulative MB; partition label histograms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

from fedtune.metrics import primary_metric  # noqa: E402


def plot_rounds(records: list[dict], task: str, path: Path) -> None:
    """Dev metric against round and against cumulative MB (up + down, log scale)."""
    metric = primary_metric(task)
    rounds = [r["round"] for r in records]
    values = [r[f"dev_{metric}"] for r in records]
    megabytes = [(r["cum_bytes_up"] + r["cum_bytes_down"]) / 1e6 for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(rounds, values, marker="o", label="global model")
    if all(f"teacher_dev_{metric}" in r for r in records):  # FedKDLoRA: the teacher(s) too
        left.plot(rounds, [r[f"teacher_dev_{metric}"] for r in records], marker="s", linestyle="--", label="teacher")
        left.legend()
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


def line_style(index: int, lines: int) -> tuple[tuple, str]:
    """Colour and marker of line `index` of `lines`: tab10 while it does not repeat, else tab20
    (the standard grid has 14 rows), and a cycle of 12 markers, so no two of 20 lines look alike."""
    color = plt.cm.tab10(index) if lines <= 10 else plt.cm.tab20(index % 20)
    return color, "osD^vP*Xh<>p"[index % 12]


def plot_compare(results: list[dict], task: str, folder: Path) -> None:
    """`metric-vs-round.png` and `metric-vs-mb.png`: one line per method (mean over seeds).

    Centralized methods have no rounds: their final metric is a dashed horizontal line.
    """
    metric = primary_metric(task)
    labels = list(dict.fromkeys(r["label"] for r in results))
    by_round, by_mb = plt.subplots(figsize=(7, 4.5)), plt.subplots(figsize=(7, 4.5))
    for index, label in enumerate(labels):
        cells = [r for r in results if r["label"] == label]
        color, marker = line_style(index, len(labels))
        if not cells[0]["rounds"]:
            value = sum(c["summary"]["dev"][metric] for c in cells) / len(cells)
            by_round[1].axhline(value, color=color, linestyle="--", label=f"{label} (centralized)")
            continue
        n = min(len(c["rounds"]) for c in cells)
        rounds = [cells[0]["rounds"][i]["round"] for i in range(n)]
        values = [sum(c["rounds"][i][f"dev_{metric}"] for c in cells) / len(cells) for i in range(n)]
        megabytes = [sum(c["rounds"][i]["cum_bytes_up"] + c["rounds"][i]["cum_bytes_down"] for c in cells)
                     / len(cells) / 1e6 for i in range(n)]
        by_round[1].plot(rounds, values, marker=marker, color=color, label=label)
        by_mb[1].plot(megabytes[1:], values[1:], marker=marker, color=color, label=label)
    by_round[1].set(xlabel="round", ylabel=f"dev {metric}", title=f"{task}: {metric} per round")
    by_round[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    by_mb[1].set(xlabel="cumulative MB sent (up + down, log scale)", ylabel=f"dev {metric}",
                 title=f"{task}: {metric} vs communication")
    by_mb[1].set_xscale("log")
    for (fig, ax), name in ((by_round, "metric-vs-round.png"), (by_mb, "metric-vs-mb.png")):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)


def plot_rank_sweep(results: list[dict], task: str, folder: Path) -> None:
    """`metric-vs-rank.png`: the rank sweep's final metric (mean ± std over seeds) and MB up per
    round against the LoRA rank, one line per method."""
    metric = primary_metric(task)
    sweep: dict[str, dict[int, list[dict]]] = {}
    for r in results:
        if " r=" in r["label"]:
            sweep.setdefault(r["label"].rsplit(" r=", 1)[0], {}).setdefault(r["settings"]["lora-r"], []).append(r)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    for name, by_rank in sweep.items():
        ranks = sorted(by_rank)
        finals = [[c["summary"]["dev"][metric] for c in by_rank[r]] for r in ranks]
        left.errorbar(ranks, [np.mean(v) for v in finals], yerr=[np.std(v) for v in finals], marker="o",
                      capsize=3, label=name)
        up = [np.mean([c["summary"]["total_bytes_up"] / c["summary"]["rounds"] for c in by_rank[r]]) / 1e6
              for r in ranks]
        right.plot(ranks, up, marker="o", label=name)
    for ax, ylabel in ((left, f"final dev {metric}"), (right, "MB up per round (all clients)")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set(xlabel="LoRA rank", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{task}: LoRA rank sweep")
    fig.tight_layout()
    fig.savefig(folder / "metric-vs-rank.png", dpi=100)
    plt.close(fig)


def plot_skew_curve(series: dict[str, list[float | None]], columns: list[str], path: Path) -> None:
    """Dev accuracy against label skew: one line per method (x: `columns`, least skewed first; a
    gap where it was not measured); remedied rows ("<method> + <remedy>") dashed."""
    fig, ax = plt.subplots(figsize=(9.5, 5))
    for index, (label, values) in enumerate(series.items()):
        color, marker = line_style(index, len(series))
        ax.plot(range(len(columns)), [np.nan if v is None else v for v in values], marker=marker, color=color,
                linestyle="--" if " + " in label else "-", label=label)
    ax.set_xticks(range(len(columns)), columns)
    ax.set(xlabel="label skew (Dirichlet alpha; IID = none)", ylabel="dev accuracy",
           title="SST-2: accuracy under label skew (4 clients, standard budget)")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")  # about one class for every sentence
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
