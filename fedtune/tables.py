"""The README's and docs/results.md's result tables, generated from the committed grid files
`docs/results/<task>-<partition>-<preset>.json` (each a copy of a finished grid's results.json).

`python -m fedtune.tables` rewrites every block between `<!-- results:NAME:begin -->` and
`<!-- results:NAME:end -->` in README.md and docs/results.md; a test checks that the committed
files match what this module generates, so no number in those blocks is typed by hand.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from fedtune.compare import markdown, stat_mean, uses_server_data
from fedtune.tasks import task_spec
from fedtune.grid import grid_rows

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
DOCUMENTS = (REPO / "README.md", REPO / "docs" / "results.md", REPO / "docs" / "results-archive.md",
             REPO / "docs" / "label-skew.md")
TASK_NAMES = {"sst2": "SST-2", "cola": "CoLA"}
PARTITION_NAMES = {"iid": "IID", "dirichlet": "Dir 0.1"}
# The seed system's published accuracies (4 clients, 10 rounds, bert-base teacher, DistilBERT
# student; its placement of the FedKDLoRA teacher is not stated, so both of our rows show it).
SEED_SYSTEM = {"Fed-finetune (FedAvg)": {"sst2": 0.907, "cola": 0.802},
               "Fed-LoRA": {"sst2": 0.881, "cola": 0.756},
               "Fed-LoRA-KD (server teacher)": {"sst2": 0.892, "cola": 0.764},
               "Fed-LoRA-KD (client teachers)": {"sst2": 0.892, "cola": 0.764}}


def load_grids(preset: str, folder: Path = RESULTS) -> dict[tuple[str, str], dict]:
    """{(task, partition): grid} for every committed grid of `preset`."""
    grids = {}
    for task in TASK_NAMES:
        for partition in PARTITION_NAMES:
            path = folder / f"{task}-{partition}-{preset}.json"
            if path.is_file():
                grids[task, partition] = json.loads(path.read_text())
    return grids


def _seeds(count: int) -> str:
    return f"{count} seed{'s' if count > 1 else ''}"


def _mean(value) -> str:
    """A seed statistic -> '0.881' (the headline shows 3 decimals; the grid tables have the std)."""
    mean = stat_mean(value)
    return "-" if mean is None else f"{mean:.3f}"


def headline(grids: dict[tuple[str, str], dict]) -> str:
    """Method x (task, partition): SST-2 accuracy, CoLA MCC and accuracy (means over seeds), the
    seed system's accuracy, and MB per round up and down."""
    if not grids:
        return "_No grid of this preset has finished yet._"
    columns, cells, traffic, server_data = [], {}, {}, set()
    for (task, partition), grid in grids.items():
        server_data |= server_data_rows(grid)
        metrics = (["MCC"] if "mcc" in task_spec(task).metrics else []) + ["accuracy"]
        for metric in metrics:
            column = f"{TASK_NAMES[task]} {PARTITION_NAMES[partition]} {'acc' if metric == 'accuracy' else metric}"
            column += f" ({_seeds(grid['seeds'])})"
            columns.append(column)
            for row in grid["table"]:
                cells.setdefault(row["method"], {})[column] = _mean(row[metric])
        for row in grid["table"]:
            traffic.setdefault(row["method"], (row["MB up / round"], row["MB down / round"]))
    order = [label for label, _ in grid_rows()]
    methods = sorted(cells, key=lambda m: order.index(m) if m in order else len(order))
    rows = []
    for method in methods:
        seed = SEED_SYSTEM.get(method)
        label = f"{method} †" if method in server_data else method
        rows.append({"method": label, **{c: cells[method].get(c, "-") for c in columns},
                     "seed system acc (SST-2 / CoLA)": f"{seed['sst2']:.3f} / {seed['cola']:.3f}" if seed else "-",
                     "MB up / round": traffic[method][0], "MB down / round": traffic[method][1]})
    note = "\n\n† the server also trains on labelled data it holds (the public slice)" if server_data else ""
    return markdown(rows) + note


def server_data_rows(grid: dict) -> set[str]:
    """Labels of the grid's federated rows whose server trains on labelled data of its own, by the
    algorithms' current `uses_server_data` (read from each cell's settings, not from the stored table)."""
    return {c["label"] for c in grid.get("cells", []) if "rounds" in c["summary"] and uses_server_data(c["settings"])}


def _with_server_data(grid: dict) -> list[dict]:
    """The grid's table with its "server data" column read again (`server_data_rows`)."""
    server = server_data_rows(grid)
    return [{**row, "server data": "yes" if row["method"] in server else "-"} if "server data" in row else row
            for row in grid["table"]]


def grid_tables(grids: dict[tuple[str, str], dict]) -> str:
    """Each grid's own table (mean ± std over seeds, bytes, seconds) and its tuning trials."""
    parts = []
    for (task, partition), grid in grids.items():
        name = f"{task}-{partition}-{grid['preset']}"
        parts.append(f"**{TASK_NAMES[task]}, {PARTITION_NAMES[partition]}** ({_seeds(grid['seeds'])}; "
                     f"`docs/results/{name}.json`)\n\n{markdown(_with_server_data(grid))}")
        if grid.get("tuning"):
            parts.append(f"Learning rates tried for {TASK_NAMES[task]} {PARTITION_NAMES[partition]} "
                         f"(scored on {grid['tuning'][0]['scored_on']}, {grid['tuning'][0]['rounds']} rounds "
                         f"or the same share of the epochs, seed {grid['tuning'][0]['seed']}):\n\n"
                         + markdown(tuning_rows(grid["tuning"])))
    return "\n\n".join(parts) if parts else "_No grid of this preset has finished yet._"


def tuning_rows(tuning: list[dict]) -> list[dict]:
    """One row per method: each tried value with its holdout score, the chosen one in bold; where
    the best score is tied, the tied trials' ROC-AUC too (the tie-break)."""
    rows = []
    for record in tuning:
        metric = record["metric"]
        top = max(t[metric] for t in record["trials"])
        tied = sum(t[metric] == top for t in record["trials"]) > 1

        def score(t: dict) -> str:
            auc = t.get("auc")
            return f"{t[metric]:.4f}" + (f" (AUC {auc:.4f})" if tied and t[metric] == top and auc is not None else "")

        tried = [f"{'**' if t['value'] == record['chosen'] else ''}{t['value']:g}: {score(t)}"
                 f"{'**' if t['value'] == record['chosen'] else ''}" for t in record["trials"]]
        rows.append({"method": record["method"], "setting": record["setting"],
                     f"holdout {record['metric']} per value": ", ".join(tried)})
    return rows


SMOKE = "sst2-iid-small-new-algorithms.json"  # the algorithms issue's smoke grid
# The same LoRA and Fed-LoRA cells (standard, SST-2 IID, lora-lr 3e-3, 2 seeds) with the model's own
# dropout and with `model-dropout 0`: what turning it off (faster on CPU) does to the dev metric.
MODEL_DROPOUT = {"model's own dropout (0.1)": "sst2-iid-standard-model-dropout-default.json",
                 "model-dropout 0": "sst2-iid-standard-model-dropout-0.json"}


def model_dropout_table(folder: Path = RESULTS) -> str:
    """Dev accuracy (mean ± std over seeds) per method, one column per dropout setting."""
    paths = {name: folder / file for name, file in MODEL_DROPOUT.items()}
    if not all(path.is_file() for path in paths.values()):
        return "_Not measured yet._"
    tables = {name: {row["method"]: row for row in json.loads(path.read_text())["table"]}
              for name, path in paths.items()}
    first = next(iter(tables.values()))
    return markdown([{"method": method, "seeds": row["seeds"], **{f"dev accuracy, {name}": table[method]["accuracy"]
                                                                   for name, table in tables.items()}}
                     for method, row in first.items()])


# The skew curve: SST-2 grids of the same budget at decreasing Dirichlet alpha (IID = no skew).
SKEW_GRIDS = {"IID": ("sst2-iid-standard.json", "sst2-iid-standard-remedies.json"),
              "Dir 0.5": ("sst2-dirichlet0.5-standard.json", "sst2-dirichlet0.5-standard-remedies.json"),
              "Dir 0.1": ("sst2-dirichlet-standard.json", "sst2-dirichlet-standard-remedies.json",
                          "sst2-dirichlet-standard-seeds.json", "sst2-dirichlet-standard-seeds3.json")}
# A later file of a column replaces the rows it shares with an earlier one (rows re-run with more
# seeds); the column's header names the seeds of its first grid, and a row with other seeds says so.


def skew_cells(folder: Path = RESULTS) -> tuple[dict[str, dict[str, dict]], set[str], dict[str, int]]:
    """({method: {column: {"accuracy", "balanced", "seeds"}}}, the rows whose server holds labelled
    data, {column: seeds of its first grid}) from the committed SST-2 grids of `SKEW_GRIDS`;
    centralized rows (no skew) left out."""
    cells, server_data, seeds = {}, set(), {}
    for column, files in SKEW_GRIDS.items():
        for file in files:
            path = folder / file
            if not path.is_file():
                continue
            grid = json.loads(path.read_text())
            server_data |= server_data_rows(grid)
            seeds.setdefault(column, grid["seeds"])
            for row in grid["table"]:
                if row["MB up / round"] in ("-", None):  # centralized rows have no skew
                    continue
                cells.setdefault(row["method"], {})[column] = {
                    "accuracy": stat_mean(row["accuracy"]), "balanced": stat_mean(row.get("balanced acc")),
                    "seeds": row.get("seeds", grid["seeds"])}
    return cells, server_data, seeds


def skew_methods(cells: dict[str, dict]) -> list[str]:
    """The methods with a skewed cell, each base row followed by its remedied rows, in grid order."""
    skewed = [m for m in cells if set(cells[m]) - {"IID"}]
    order = [label for label, _ in grid_rows()]
    base = lambda m: m.split(" + ")[0]  # noqa: E731
    return sorted({base(m) for m in skewed} | set(skewed),
                  key=lambda m: (order.index(base(m)) if base(m) in order else len(order), m != base(m), m))


def _skew_text(cell: dict, first_seeds: int | None) -> str:
    """One cell of a skew table: accuracy (balanced accuracy), and its seeds where they differ
    from its column's."""
    value = f"{cell['accuracy']:.3f}"
    if cell["balanced"] is not None:
        value += f" ({cell['balanced']:.3f})"
    if cell["seeds"] != first_seeds:
        value += f", {_seeds(cell['seeds'])}"
    return value


def skew_curve(folder: Path = RESULTS) -> str:
    """Federated method (with or without a remedy) x skew: SST-2 dev accuracy, with balanced
    accuracy in brackets where recorded; the methods that have a skewed cell at all."""
    cells, server_data, seeds = skew_cells(folder)
    methods = skew_methods(cells)
    if not methods:
        return "_No skewed grid has finished yet._"
    text = lambda cell, column: _skew_text(cell, seeds.get(column))  # noqa: E731
    columns = [f"{c} ({_seeds(seeds[c])})" if c in seeds else c for c in SKEW_GRIDS]
    rows = [{"method": f"{m} †" if m in server_data else m,
             **{column: text(cells[m][c], c) if c in cells.get(m, {}) else "-"
                for column, c in zip(columns, SKEW_GRIDS)}} for m in methods]
    return (markdown(rows) + "\n\nSST-2 dev accuracy (balanced accuracy); - not run yet. † the server also trains "
            "on labelled data it holds (the public slice).")


def skew_summary(folder: Path = RESULTS) -> str:
    """The skew curve one row per federated method: its accuracy under each skew without a remedy,
    and under each skewed column the best of its remedied rows that give the server no data it
    did not already have (`server-finetune` on a row without it is left to the full table), with
    the remedy's name. The README's view of `skew_curve`."""
    cells, server_data, seeds = skew_cells(folder)
    methods = skew_methods(cells)
    if not methods:
        return "_No skewed grid has finished yet._"
    bases = [m for m in methods if " + " not in m]
    header = lambda c: f"{c} ({_seeds(seeds[c])})" if c in seeds else c  # noqa: E731
    rows = []
    for base in bases:
        row = {"method": f"{base} †" if base in server_data else base}
        for column in SKEW_GRIDS:
            cell = cells.get(base, {}).get(column)
            row[header(column)] = _skew_text(cell, seeds.get(column)) if cell else "-"
            if column == "IID":
                continue
            remedied = [m for m in methods if m.startswith(f"{base} + ") and column in cells[m]
                        and (m not in server_data or base in server_data)]
            if remedied:
                best, luckier = _best_remedy({m: cells[m][column] for m in remedied})
                below = cell is not None and cells[best][column]["accuracy"] < cell["accuracy"]
                text = (f"{best.split(' + ', 1)[1]}: {_skew_text(cells[best][column], seeds.get(column))}"
                        + (" ↓" if below else ""))
                if luckier is not None:
                    one = cells[luckier][column]
                    text += f"; on {_seeds(one['seeds'])}: {luckier.split(' + ', 1)[1]} {one['accuracy']:.3f}"
                row[f"best remedy, {column}"] = text
            else:
                row[f"best remedy, {column}"] = "-"
        rows.append(row)
    return (markdown(rows) + "\n\nSST-2 dev accuracy (balanced accuracy); - not run yet. Best remedy: the most "
            "accurate of the row's remedied rows that give the server no labelled data it did not already have, "
            "among those measured on two seeds or more where there are any (a one-seed row that scored higher is "
            "named after it: one seed's luck is not a ranking); ↓ even it is below the row without a remedy. "
            "† the server also trains on labelled data it holds (the public slice).")


def _best_remedy(cells: dict[str, dict]) -> tuple[str, str | None]:
    """(the remedied row to name, a one-seed row whose single run beat it or None), from {row: cell}:
    rows measured on two seeds or more outrank one-seed rows, then the higher mean accuracy wins."""
    best = max(cells, key=lambda m: (cells[m]["seeds"] >= 2, cells[m]["accuracy"]))
    single = [m for m in cells if cells[m]["seeds"] < 2]
    luckier = max(single, key=lambda m: cells[m]["accuracy"]) if single and cells[best]["seeds"] >= 2 else None
    if luckier is not None and cells[luckier]["accuracy"] <= cells[best]["accuracy"]:
        luckier = None
    return best, luckier


def skew_plot(folder: Path = RESULTS, path: Path | None = None) -> dict[str, list[float | None]]:
    """`skew-curve.png` in `folder` (or `path`): SST-2 dev accuracy against the skew, one line per
    method measured under two neighbouring skews at least (no line crosses a skew it was not
    measured under); returns what it drew, {label: accuracy per column, None where not measured}."""
    from fedtune.plots import plot_skew_curve

    cells, server_data, _ = skew_cells(folder)
    columns = list(SKEW_GRIDS)
    series = {}
    for method in skew_methods(cells):
        values = [cells[method][c]["accuracy"] if c in cells.get(method, {}) else None for c in columns]
        if any(a is not None and b is not None for a, b in zip(values, values[1:])):
            series[f"{method} †" if method in server_data else method] = values
    if series:
        plot_skew_curve(series, columns, path or folder / "skew-curve.png")
    return series


def blocks(folder: Path = RESULTS) -> dict[str, str]:
    """Every generated block, by name."""
    standard = load_grids("standard", folder)
    smoke = folder / SMOKE
    return {"standard-headline": headline(standard), "standard-grids": grid_tables(standard),
            "smoke-new-algorithms": markdown(json.loads(smoke.read_text())["table"]) if smoke.is_file()
            else "_Not run yet._", "model-dropout": model_dropout_table(folder), "skew-curve": skew_curve(folder),
            "skew-summary": skew_summary(folder)}


def render(text: str, generated: dict[str, str]) -> str:
    """`text` with every results block replaced by its generated content."""
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in generated:
            raise ValueError(f"unknown results block {name!r} (known: {', '.join(generated)})")
        return f"<!-- results:{name}:begin -->\n{generated[name]}\n<!-- results:{name}:end -->"

    return re.sub(r"<!-- results:([\w-]+):begin -->.*?<!-- results:\1:end -->", replace, text, flags=re.S)


def main() -> int:
    generated = blocks()
    for path in DOCUMENTS:
        path.write_text(render(path.read_text(), generated))
        print(f"updated {path.relative_to(REPO)}")
    if skew_plot():
        print(f"updated {(RESULTS / 'skew-curve.png').relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
