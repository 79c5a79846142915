"""`fedtune report`: one Markdown table from the `summary.json` of finished run folders."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.runs import INCOMPLETE


def find_summaries(root: str | Path, skipped: list[str] | None = None) -> list[dict]:
    """Summaries of the finished runs under `root` (folders still `.incomplete` are skipped; a
    summary.json that cannot be read is named in `skipped`, with why, and left out)."""
    found = []
    for path in sorted(Path(root).rglob("summary.json")):
        if path.parent.name.endswith(INCOMPLETE):
            continue
        try:
            summary = json.loads(path.read_text())
            summary["dev"]["accuracy"], summary["task"], summary["seconds"]  # noqa: B018  (the fields the table reads)
        except (OSError, ValueError, KeyError, TypeError) as err:
            if skipped is not None:
                skipped.append(f"{path}: {type(err).__name__}: {err}")
            continue
        found.append({**summary, "run": path.parent.name})
    return found


def _metric_cell(summary: dict) -> str:
    dev = summary["dev"]
    cell = f"acc {dev['accuracy']:.4f}"
    return f"MCC {dev['mcc']:.4f}, {cell}" if "mcc" in dev else cell


def markdown_table(summaries: list[dict]) -> str:
    """Method, task, dev metric, samples trained on, MB per round up/down, total MB, seconds."""
    lines = ["| run | method | task | dev metric | train samples | MB up / round | MB down / round | total MB "
             "| aggregation s / round | seconds |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        if "algorithm" in s:  # federated
            rounds = max(1, s["rounds"])
            up, down = s["total_bytes_up"] / 1e6, s["total_bytes_down"] / 1e6
            method, samples = f"{s['algorithm']}{_ranks(s)} ({s['clients']} clients, {s['rounds']} rounds)", s["examples_seen"]
            traffic = (f"{up / rounds:.3f}", f"{down / rounds:.3f}", f"{up + down:.2f}",
                       f"{s.get('aggregate_seconds_per_round', 0.0):.4f}")
        else:
            method, samples, traffic = f"centralized {s['method']}", s["train_samples"], ("-", "-", "-", "-")
        lines.append(f"| {s['run']} | {method} | {s['task']} | {_metric_cell(s)} | {samples} | "
                     f"{' | '.join(traffic)} | {s['seconds']:.0f} |")
    return "\n".join(lines)


def _ranks(summary: dict) -> str:
    if summary.get("client_ranks"):
        return f" r={','.join(map(str, summary['client_ranks']))}"
    return f" r={summary['lora_r']}" if summary.get("lora_r") else ""
