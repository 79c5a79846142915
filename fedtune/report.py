"""`fedtune report`: one Markdown table from the `summary.json` of finished run folders."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.metrics import learned_nothing
from fedtune.runs import INCOMPLETE


def find_summaries(root: str | Path, skipped: list[str] | None = None) -> list[dict]:
    """Summaries of the finished runs under `root` (folders still `.incomplete` are skipped; a
    summary.json that cannot be read is named in `skipped`, with why, and left out)."""
    found = []
    for path in sorted(Path(root).rglob("summary.json")):
        if path.parent.name.endswith(INCOMPLETE):
            continue
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
            problem = summary_problem(summary)
        except (OSError, ValueError) as err:
            problem = f"{type(err).__name__}: {err}"
        if problem:
            if skipped is not None:
                skipped.append(f"{path}: {problem}")
            continue
        found.append({**summary, "run": path.parent.name})
    return found


def summary_problem(summary) -> str | None:
    """Why `summary` (a parsed summary.json) cannot be a row of the table, or None."""
    if not isinstance(summary, dict):
        return "not a JSON object"
    if not isinstance(summary.get("dev"), dict):
        return "'dev' is not an object of metrics"
    numbers = {"dev.accuracy": summary["dev"].get("accuracy"), "seconds": summary.get("seconds")}
    if "mcc" in summary["dev"]:
        numbers["dev.mcc"] = summary["dev"]["mcc"]
    if "algorithm" in summary:
        numbers |= {k: summary.get(k) for k in ("rounds", "clients", "total_bytes_up", "total_bytes_down",
                                                 "examples_seen")}
    else:
        numbers["train_samples"] = summary.get("train_samples")
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{key} is {value!r}, not a number"
    for key in ("task", "algorithm" if "algorithm" in summary else "method"):
        if not isinstance(summary.get(key), str):
            return f"{key} is {summary.get(key)!r}, not a string"
    return None


def _metric_cell(summary: dict) -> str:
    dev = summary["dev"]
    cell = f"acc {dev['accuracy']:.4f}"
    cell = f"MCC {dev['mcc']:.4f}, {cell}" if "mcc" in dev else cell
    return cell + (" (one class: learned nothing)" if learned_nothing(dev) else "")


def markdown_table(summaries: list[dict]) -> str:
    """Method, task, dev metric, samples trained on, MB per round up/down, total MB, seconds."""
    lines = ["| run | method | task | dev metric | train samples | MB up / round | MB down / round | total MB "
             "| aggregation s / round | seconds |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        if "algorithm" in s:  # federated
            rounds = max(1, s["rounds"])
            up, down = s["total_bytes_up"] / 1e6, s["total_bytes_down"] / 1e6
            failed = f", {s['failed_rounds']} rounds failed" if s.get("failed_rounds") else ""
            method = f"{s['algorithm']}{_ranks(s)} ({s['clients']} clients, {s['rounds']} rounds{failed})"
            samples = s["examples_seen"]
            traffic = (f"{up / rounds:.3f}", f"{down / rounds:.3f}", f"{up + down:.2f}",
                       f"{s.get('aggregate_seconds_per_round', 0.0):.4f}")
        else:
            method, samples, traffic = f"centralized {s['method']}", s["train_samples"], ("-", "-", "-", "-")
        lines.append(f"| {s['run']} | {method} | {s['task']} | {_metric_cell(s)} | {samples} | "
                     f"{' | '.join(traffic)} | {s['seconds']:.0f} |")
    return "\n".join(lines)


def _ranks(summary: dict) -> str:
    if isinstance(summary.get("client_ranks"), list):
        return f" r={','.join(map(str, summary['client_ranks']))}"
    return f" r={summary['lora_r']}" if isinstance(summary.get("lora_r"), int) else ""
