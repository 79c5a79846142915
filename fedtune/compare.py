"""`fedtune compare`: the method-comparison grid (centralized and federated) under one budget.

Every cell is one run (a method and a seed). A finished cell is stored as
`<out-dir>/compare/cells/<key>.json`, keyed by a hash of its resolved settings, so a rerun
reuses it and an interrupted grid resumes where it stopped. Cells of all grids share one
folder: a Dirichlet grid reuses the IID grid's centralized cells, and all KD cells of a
seed share one pre-trained teacher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from fedtune.config import Settings
from fedtune.console import say
from fedtune.metrics import primary_metric
from fedtune.runs import read_jsonl, write_json

# Budgets. `small` runs one task's grid (one seed) in well under an hour on a 2-core CPU;
# `full` is the seed system's setting and wants a GPU.
PRESETS: dict[str, dict] = {
    "small": {"train_limit": 1000, "clients": 4, "rounds": 3, "local_epochs": 1.0, "lora_lr": 3e-3,
              "teacher_epochs": 0.25},
    "full": {"train_limit": 0, "clients": 4, "rounds": 10, "local_epochs": 1.0, "lora_lr": 1e-3,
             "teacher_epochs": 1.0},
}
# CoLA needs more than SST-2 before all-MiniLM-L6-v2 leaves the majority class (at SST-2's `small`
# budget every method, teacher included, ends at MCC 0): every private row (6,841), a larger full
# fine-tuning step and a longer-trained teacher; rows are batched by length to stay within the hour.
TASK_PRESETS: dict[tuple[str, str], dict] = {
    ("small", "cola"): {"train_limit": 0, "full_lr": 1e-4, "teacher_epochs": 3.0, "batching": "by-length"},
}

# (row label, changes to the base settings); `method` cells are centralized, `algorithm` federated.
METHODS: list[tuple[str, dict]] = [
    ("Finetune", {"method": "finetune"}),
    ("KD", {"method": "kd"}),
    ("LoRA", {"method": "lora"}),
    ("Fed-finetune (FedAvg)", {"algorithm": "fedavg"}),
    ("Fed-LoRA", {"algorithm": "fedlora"}),
    ("Fed-LoRA-KD (server teacher)", {"algorithm": "fedkdlora", "kd_placement": "server"}),
    ("Fed-LoRA-KD (client teachers)", {"algorithm": "fedkdlora", "kd_placement": "client"}),
    ("FlexLoRA", {"algorithm": "flexlora"}),
    ("HetLoRA", {"algorithm": "hetlora"}),
]
SWEEP_RANKS = (4, 8, 16, 32)

# Settings a centralized run does not read: normalised before hashing so grids share those cells.
FEDERATED_ONLY = ("algorithm", "clients", "rounds", "fraction_train", "local_epochs", "local_steps", "partition",
                  "dirichlet_alpha", "classes_per_client", "min_partition_size", "round_timeout",
                  "rank_distribution", "rank_set", "client_ranks", "kd_placement", "kd_server_steps", "codec",
                  "svd_energy_start", "svd_energy_end")


@dataclasses.dataclass(frozen=True)
class Cell:
    label: str
    settings: Settings
    centralized: bool

    @property
    def key(self) -> str:
        settings = self.settings
        if self.centralized:
            defaults = Settings()
            settings = settings.replace(**{name: getattr(defaults, name) for name in FEDERATED_ONLY})
        # Only values that differ from the defaults: a setting added later (at its default) keeps old keys.
        defaults = Settings().to_dict()
        values = {k: v for k, v in {**settings.to_dict(), "glue-dir": settings.resolved_glue_dir}.items()
                  if v != defaults[k] and k != "out-dir"}
        values["kind"] = "centralized" if self.centralized else "federated"
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def make_grid(base: Settings, seeds: int, rank_sweep: bool = False, methods: list[str] | None = None) -> list[Cell]:
    """Every (method, seed) cell. Centralized cells train rounds x local-epochs epochs: the
    federation's total budget."""
    rows = [(label, changes) for label, changes in METHODS if methods is None or label in methods]
    if rank_sweep:
        rows += [(f"{name} r={r}", {"algorithm": algorithm, "lora_r": r})
                 for r in SWEEP_RANKS for name, algorithm in (("Fed-LoRA", "fedlora"), ("Fed-LoRA-KD", "fedkdlora"))]
    base = base.replace(epochs=base.rounds * base.local_epochs)
    return [Cell(label, base.replace(seed=base.seed + i, **changes), "method" in changes)
            for label, changes in rows for i in range(seeds)]


def run_cell(cell: Cell, cells_dir: Path, quiet: bool) -> dict:
    """The cell's result, from the cache or from running it now."""
    cached = cells_dir / f"{cell.key}.json"
    if cached.is_file():
        say(f"reusing {cell.label} (seed {cell.settings.seed}): {cached}", quiet)
        # Another row may have computed it (Fed-LoRA is the rank sweep's Fed-LoRA r=8): label it as this row.
        return {**json.loads(cached.read_text()), "label": cell.label}
    say(f"[bold]{cell.label}[/] (seed {cell.settings.seed})", quiet)
    settings = cell.settings.replace(out_dir=str(cells_dir))
    start = time.perf_counter()
    if cell.centralized:
        from fedtune.centralized import run_centralized

        path = run_centralized(settings, quiet)
        rounds = []
    else:
        from fedtune.simulation import run_federated

        path = run_federated(settings, quiet)
        rounds = read_jsonl(path / "rounds.jsonl")
    result = {"label": cell.label, "seed": settings.seed, "key": cell.key, "run": str(path),
              "wall_seconds": time.perf_counter() - start, "settings": settings.to_dict(),
              "summary": json.loads((path / "summary.json").read_text()), "rounds": rounds}
    write_json(cached, result)
    return result


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}" if values else "-"


def table(results: list[dict], task: str) -> list[dict]:
    """One row per method: metric mean ± std over seeds, MB per round up/down, total MB, seconds."""
    rows = []
    for label in dict.fromkeys(r["label"] for r in results):
        cells = [r for r in results if r["label"] == label]
        dev = [c["summary"]["dev"] for c in cells]
        row = {"method": label, "seeds": len(cells)}
        if task == "cola":
            row["MCC"] = _mean_std([d["mcc"] for d in dev])
        row["accuracy"] = _mean_std([d["accuracy"] for d in dev])
        teacher = [(c["summary"].get("teacher_dev") or {}).get(primary_metric(task)) for c in cells]
        row["teacher"] = _mean_std(teacher)
        if "rounds" in cells[0]["summary"]:
            n = cells[0]["summary"]["rounds"]
            up = np.mean([c["summary"]["total_bytes_up"] for c in cells]) / 1e6
            down = np.mean([c["summary"]["total_bytes_down"] for c in cells]) / 1e6
            row.update({"MB up / round": f"{up / n:.3f}", "MB down / round": f"{down / n:.3f}",
                        "total MB": f"{up + down:.2f}"})
        else:
            row.update({"MB up / round": "-", "MB down / round": "-", "total MB": "-"})
        row["seconds"] = f"{np.mean([c['wall_seconds'] for c in cells]):.0f}"
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if h == "method" else "---:" for h in header) + "|"]
    lines += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines)


def seed_table(root: Path, partition: str, preset: str) -> str:
    """The seed system's table: one row per method, one column per task metric (mean ± std), from
    every task whose grid for this partition and preset has finished under `root`."""
    from fedtune.data import TASK_SPECS

    columns, rows = [], {}
    for task, spec in TASK_SPECS.items():
        path = root / f"{task}-{partition}-{preset}" / "results.json"
        if not path.is_file():
            continue
        grid = json.loads(path.read_text())
        for metric in [m for m in ("MCC", "accuracy") if m in grid["table"][0]]:  # as `table` wrote them
            column = f"{spec.folder} {metric} ({grid['seeds']} seeds)"
            columns.append(column)
            for row in grid["table"]:
                rows.setdefault(row["method"], {})[column] = row[metric]
                rows[row["method"]].setdefault("MB up / round", row["MB up / round"])  # the same for every task
    order = [label for label, _ in METHODS]
    methods = sorted(rows, key=lambda m: order.index(m) if m in order else len(order))
    table = [{"method": m, **{c: rows[m].get(c, "-") for c in columns + ["MB up / round"]}} for m in methods]
    return markdown(table)


def preset_settings(preset: str, given: dict | None = None) -> Settings:
    """The preset's settings for the task in `given` (default: SST-2), with `given` (kebab-case
    keys, e.g. from flags) on top."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    given = given or {}
    values = {**PRESETS[preset], **TASK_PRESETS.get((preset, given.get("task", Settings().task)), {})}
    return Settings.from_dict(given, Settings().replace(**values))


def run_compare(base: Settings, preset: str, seeds: int, rank_sweep: bool = False,
                methods: list[str] | None = None, quiet: bool = False) -> Path:
    """Run (or reuse) every cell of the grid for `base` (see `preset_settings`), then write
    table.md, results.json and the plots under `<out-dir>/compare/<task>-<partition>-<preset>/`
    (`...-ranks/` with the rank sweep, which adds `metric-vs-rank.png`), and the seed system's
    method x task table of every finished task as `<out-dir>/compare/<partition>-<preset>.md`."""
    if seeds < 1:
        raise ValueError(f"seeds={seeds} (must be >= 1)")
    known = [label for label, _ in METHODS]
    if methods and (unknown := [m for m in methods if m not in known]):
        raise ValueError(f"unknown method(s) {unknown} (known: {', '.join(known)})")
    root = Path(base.out_dir) / "compare"
    cells_dir = root / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    results = [run_cell(cell, cells_dir, quiet) for cell in make_grid(base, seeds, rank_sweep, methods)]

    from fedtune.plots import plot_compare, plot_rank_sweep

    folder = root / (f"{base.task}-{base.partition}-{preset}" + ("-ranks" if rank_sweep else ""))
    folder.mkdir(parents=True, exist_ok=True)
    rows = table(results, base.task)
    (folder / "table.md").write_text(markdown(rows) + "\n")
    write_json(folder / "results.json", {"task": base.task, "partition": base.partition, "preset": preset,
                                         "seeds": seeds, "settings": base.to_dict(), "table": rows,
                                         "cells": results})
    plot_compare(results, base.task, folder)
    if rank_sweep:
        plot_rank_sweep(results, base.task, folder)
    else:
        (root / f"{base.partition}-{preset}.md").write_text(seed_table(root, base.partition, preset) + "\n")
    say(markdown(rows), quiet)
    say(f"saved {folder}", quiet)
    return folder
