"""`fedtune compare`: the method-comparison grid (centralized and federated) under one budget.

Every cell is one run (a method and a seed), cached (`fedtune.grid`); this module picks the
budget (presets), runs the grid, and writes the table, plots and results.json.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from fedtune.config import Settings, key_of
from fedtune.console import say, warn
from fedtune.grid import NotCached, cached_only, grid_rows, make_grid, run_cells
from fedtune.metrics import primary_metric
from fedtune.tasks import task_spec
from fedtune.runs import write_json
from fedtune.tune import (TUNE_ROUND_SHARE, check_share, chosen_values, first_trials, lr_setting, tune_methods,
                          tune_row)

# Budgets. `small` is the quick smoke grid (one task, one seed in well under an hour on a 2-core
# CPU; at it most methods have not left the majority class). `standard` is sized so that every
# method trains long enough for the comparison to mean something, and one seed of one task's grid
# still fits about an hour on 2 cores: 4 clients, 10 rounds, all private rows, batches by length,
# each client a short local pass per round (SST-2: 0.06 of its ~13,500 rows; CoLA: half its ~1,700).
# `full` is the seed system's setting and wants a GPU.
PRESETS: dict[str, dict] = {
    "small": {"train_limit": 1000, "clients": 4, "rounds": 3, "local_epochs": 1.0, "lora_lr": 3e-3,
              "teacher_epochs": 0.25},
    "standard": {"train_limit": 0, "clients": 4, "rounds": 10, "local_epochs": 0.06, "full_lr": 1e-4,
                 "lora_lr": 3e-3, "teacher_epochs": 1.0, "batching": "by-length"},
    "full": {"train_limit": 0, "clients": 4, "rounds": 10, "local_epochs": 1.0, "lora_lr": 1e-3,
             "teacher_epochs": 1.0},
}
# CoLA needs more than SST-2 before all-MiniLM-L6-v2 leaves the majority class (at SST-2's `small`
# budget every method, teacher included, ends at MCC 0): every private row (6,841), a larger full
# fine-tuning step and a longer-trained teacher; rows are batched by length to stay within the hour.
TASK_PRESETS: dict[tuple[str, str], dict] = {
    ("small", "cola"): {"train_limit": 0, "full_lr": 1e-4, "teacher_epochs": 3.0, "batching": "by-length"},
    ("standard", "cola"): {"local_epochs": 0.5, "teacher_epochs": 3.0},
}


def _mean_std(values: list[float]) -> dict | None:
    """Over seeds: {"mean", "std", "values"} (numbers, as results.json stores them), or None."""
    values = [float(v) for v in values if v is not None]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values} if values else None


def cell_text(value) -> str:
    """How a table cell is shown: a seed statistic as "mean ± std" (4 decimals), None as "-".
    Results written before the statistics were stored as numbers hold that text already."""
    if isinstance(value, dict) and "mean" in value:
        return f"{value['mean']:.4f} ± {value['std']:.4f}"
    return "-" if value is None else str(value)


def stat_mean(value) -> float | None:
    """The mean of a seed statistic, whether stored as numbers or (older results) as text."""
    if isinstance(value, dict):
        return value["mean"]
    return None if value in (None, "-") else float(str(value).split(" ± ")[0])


def table(results: list[dict], task: str) -> list[dict]:
    """One row per method: metric mean ± std over seeds, MB per round up/down, total MB, seconds."""
    rows = []
    # cells since label-skew metrics are recorded have them; a column for every row if any has them
    skew = any("balanced_accuracy" in r["summary"]["dev"] for r in results)
    for label in dict.fromkeys(r["label"] for r in results):
        cells = [r for r in results if r["label"] == label]
        dev = [c["summary"]["dev"] for c in cells]
        row = {"method": label, "seeds": len(cells)}
        if "mcc" in task_spec(task).metrics:
            row["MCC"] = _mean_std([d["mcc"] for d in dev])
        row["accuracy"] = _mean_std([d["accuracy"] for d in dev])
        if skew:
            row["balanced acc"] = _mean_std([d.get("balanced_accuracy") for d in dev])
            row["worst-class recall"] = _mean_std([d.get("worst_class_recall") for d in dev])
        teacher = [(c["summary"].get("teacher_dev") or {}).get(primary_metric(task)) for c in cells]
        row["teacher"] = _mean_std(teacher)
        centralized = "rounds" not in cells[0]["summary"]
        lr_field = lr_setting(Settings.from_dict(cells[0]["settings"]), centralized)
        row["lr"] = f'{cells[0]["settings"][key_of(lr_field)]:g}'
        if not centralized:
            n = cells[0]["summary"]["rounds"]
            up = np.mean([c["summary"]["total_bytes_up"] for c in cells]) / 1e6
            down = np.mean([c["summary"]["total_bytes_down"] for c in cells]) / 1e6
            row.update({"MB up / round": f"{up / n:.3f}", "MB down / round": f"{down / n:.3f}",
                        "total MB": f"{up + down:.2f}"})
        else:
            row.update({"MB up / round": "-", "MB down / round": "-", "total MB": "-"})
        row["server data"] = "yes" if not centralized and uses_server_data(cells[0]["settings"]) else "-"
        row["seconds"] = f"{np.mean([c['wall_seconds'] for c in cells]):.0f}"
        rows.append(row)
    return rows


def uses_server_data(settings: dict) -> bool:
    """Whether a federated cell's server trained on labelled data of its own (the public slice):
    FedKDLoRA's server teacher, or `server-finetune-steps` (from the cell's kebab-case settings)."""
    from fedtune.algorithms import get_algorithm

    return get_algorithm(settings["algorithm"], Settings.from_dict(settings)).uses_server_data


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if h == "method" else "---:" for h in header) + "|"]
    lines += ["| " + " | ".join(cell_text(row[h]) for h in header) + " |" for row in rows]
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
    order = [label for label, _ in grid_rows()]
    methods = sorted(rows, key=lambda m: order.index(m) if m in order else len(order))
    table = [{"method": m, **{c: rows[m].get(c, "-") for c in columns + ["MB up / round"]}} for m in methods]
    return markdown(table)


def partition_name(settings: Settings) -> str:
    """How results folders name the partition: iid, dirichlet (alpha 0.1, the standard grids'),
    dirichlet<alpha> for another alpha, pathological."""
    if settings.partition == "dirichlet" and settings.dirichlet_alpha != 0.1:
        return f"dirichlet{settings.dirichlet_alpha:g}"
    return settings.partition


def preset_settings(preset: str, given: dict | None = None) -> Settings:
    """The preset's settings for the task in `given` (default: SST-2), with `given` (kebab-case
    keys, e.g. from flags) on top."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    given = given or {}
    values = {**PRESETS[preset], **TASK_PRESETS.get((preset, given.get("task", Settings().task)), {})}
    return Settings.from_dict(given, Settings().replace(**values))


def check_jobs(jobs: int, base: Settings) -> None:
    """`jobs` cells at a time: a positive count, on the local engine (Ray schedules its own workers)."""
    if jobs < 1:
        raise ValueError(f"--jobs {jobs} (must be >= 1)")
    if jobs > 1 and base.engine != "local":
        raise ValueError(f"--jobs {jobs} runs cells side by side in processes of their own; with engine "
                         f"{base.engine!r} each would start its own Ray cluster: add --engine local")


def with_earlier_rows(path: Path, header: dict, results: list[dict], tuning: list[dict]) -> tuple[list, list]:
    """(cells, tuning) of this invocation plus the rows an earlier one wrote to the grid's
    `results.json` (`path`) that this one did not run again, so rows run one invocation at a time
    add up to one table. Only rows of the same base settings, seeds and tuning join, and only cells
    whose key is still what their settings give (an algorithm whose maths changed drops its old
    rows); rows are in the grid's order, each remedied row after its method."""
    from fedtune.grid import Cell

    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return results, tuning
    if not isinstance(earlier, dict) or any(earlier.get(k) != v for k, v in header.items()):
        return results, tuning
    labels = {r["label"] for r in results}

    def current(cell) -> bool:
        # In the grid's precision: a cell reused from the cache keeps the settings of the run that made
        # it, whose `auto` may have meant fp32 then (the host's `auto` is bf16 now) though it was the
        # fp32 cell this grid asked for.
        try:
            settings = Settings.from_dict({**cell["settings"], "precision": header["settings"]["precision"]})
            return Cell(cell["label"], settings, not cell["rounds"]).key == cell["key"]
        except (KeyError, TypeError, ValueError):
            return False

    others = [c for c in earlier.get("cells", []) if isinstance(c, dict) and c.get("label") not in labels]
    kept = [c for c in others if current(c)]
    kept_labels = {c["label"] for c in kept}
    if stale := sorted({str(c.get("label")) for c in others} - kept_labels):
        warn(f"{path}: {len(stale)} earlier row(s) left out, their cells made under settings or maths that "
             f"have changed since (run them again to have them back): {', '.join(stale)}")
    order = [label for label, _ in grid_rows()]

    def position(cell: dict) -> tuple[int, bool]:
        base = cell["label"].split(" + ")[0]
        return order.index(base) if base in order else len(order), base != cell["label"]

    return (sorted(kept + results, key=position),
            [t for t in earlier.get("tuning", []) if t.get("method") in kept_labels] + tuning)


def finished_rows(base: Settings, seeds: int, rank_sweep: bool, methods: list[str] | None,
                  remedy_names: list[str] | None, tune: bool, tune_share: float, cells_dir: Path) -> tuple[list, list]:
    """(labels of the rows whose cells, and with `tune` whose tuning trials, are all finished in
    `cells_dir`; "<label>: <why not>" for the others). Reads cells only; call inside `grid.cached_only()`."""
    done, left_out = [], []
    for cell in make_grid(base, 1, rank_sweep, methods, None, remedy_names):
        try:
            tuned = {}
            if tune and " r=" not in cell.label:  # the rank sweep's rows are not tuned
                tuned = chosen_values(tune_row(cell.label, cell.settings, cell.centralized, cells_dir, True, tune_share))
            for each in make_grid(base, seeds, rank_sweep, [cell.label], tuned, remedy_names):
                if each.label == cell.label and not (cells_dir / f"{each.key}.json").is_file():
                    raise NotCached(f"seed {each.settings.seed} is not finished (cell {each.key})")
        except NotCached as err:
            left_out.append(f"{cell.label}: {err}")
        else:
            done.append(cell.label)
    if rank_sweep and (sweep := [why for why in left_out if " r=" in why.split(":")[0]]):
        raise ValueError(f"--cached-only with --rank-sweep needs every rank-sweep cell finished; not finished: {sweep}")
    return done, left_out


def run_compare(base: Settings, preset: str, seeds: int, rank_sweep: bool = False,
                methods: list[str] | None = None, quiet: bool = False, tune: bool = False,
                remedy_names: list[str] | None = None, tune_share: float = TUNE_ROUND_SHARE, jobs: int = 1,
                cached_only_rows: bool = False) -> Path:
    """Run (or reuse) every cell of the grid for `base` (see `preset_settings`), then write
    table.md, results.json and the plots under `<out-dir>/compare/<task>-<partition>-<preset>/`
    (`...-ranks/` with the rank sweep, which adds `metric-vs-rank.png`; `...-remedies/` with
    `remedy_names`, each federated row then followed by its remedied rows), and the seed system's
    method x task table of every finished task as `<out-dir>/compare/<partition>-<preset>.md`.

    With `tune`, each row first has its learning rate chosen on a holdout of the private rows
    (`fedtune.tune`), each trial at `tune_share` of the row's budget; results.json records every trial.
    Rows an earlier invocation wrote to the same folder under the same settings stay in its table
    (`with_earlier_rows`), so a long grid can run one row at a time. `jobs` > 1 runs that many cells
    (and first tuning trials) at a time, each in its own process (`grid.run_cells`).

    With `cached_only_rows` nothing trains: the table holds the rows whose cells (and trials) are
    all finished, and the rows left out are named on stderr."""
    if seeds < 1:
        raise ValueError(f"seeds={seeds} (must be >= 1)")
    check_jobs(jobs, base)
    check_share(tune_share)
    from fedtune.grid import remedy_settings

    known = [label for label, _ in grid_rows()]
    known += [f"{label} + {r}" for label in known for r in remedy_names or ()]
    if methods and (unknown := [m for m in methods if m not in known]):
        raise ValueError(f"unknown method(s) {unknown} (known: {', '.join(known)})")

    for name in remedy_names or ():
        remedy_settings(name)  # one clear error for an unknown remedy or a clash
    root = Path(base.out_dir) / "compare"
    cells_dir = root / "cells"
    only = None  # every row of `methods`
    if cached_only_rows:
        if not cells_dir.is_dir():
            raise ValueError(f"--cached-only: no finished cells under {cells_dir} (no grid has run with this --out-dir)")
        with cached_only():
            done, left_out = finished_rows(base, seeds, rank_sweep, methods, remedy_names, tune, tune_share, cells_dir)
        if not done:
            raise ValueError(f"--cached-only: no row of this grid is finished in {cells_dir}: " + "; ".join(left_out))
        for why in left_out:
            warn(f"left out (--cached-only): {why}")
        only = set(done)
    cells_dir.mkdir(parents=True, exist_ok=True)
    with cached_only() if cached_only_rows else contextlib.nullcontext():
        tuning = []
        if tune:
            if jobs > 1:
                run_cells(first_trials(base, methods, remedy_names, tune_share, only), cells_dir, quiet, jobs)
            tuning = tune_methods(base, methods, cells_dir, quiet, remedy_names, tune_share, only)
        tuned = chosen_values(tuning)
        results = run_cells(make_grid(base, seeds, rank_sweep, methods, tuned, remedy_names, only), cells_dir, quiet,
                            jobs)

    from fedtune.plots import plot_compare, plot_rank_sweep

    folder = root / (f"{base.task}-{partition_name(base)}-{preset}" + ("-ranks" if rank_sweep else "")
                     + ("-remedies" if remedy_names else ""))
    folder.mkdir(parents=True, exist_ok=True)
    header = {"task": base.task, "partition": base.partition, "preset": preset, "seeds": seeds,
              "settings": base.to_dict(), "tune_share": tune_share if tune else None}
    results, tuning = with_earlier_rows(folder / "results.json", header, results, tuning)
    rows = table(results, base.task)
    (folder / "table.md").write_text(markdown(rows) + "\n")
    write_json(folder / "results.json", {**header, "table": rows, "tuning": tuning, "cells": results})
    plot_compare(results, base.task, folder)
    if rank_sweep:
        plot_rank_sweep(results, base.task, folder)
    elif not remedy_names:
        (root / f"{partition_name(base)}-{preset}.md").write_text(seed_table(root, partition_name(base), preset) + "\n")
    say(markdown(rows), quiet)
    say(f"saved {folder}", quiet)
    return folder
