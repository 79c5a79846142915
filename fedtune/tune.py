"""`fedtune compare --tune`: each method's learning rate chosen on a validation split of the
private train rows, never on GLUE dev (dev is the test set every table reports).

For every row of the grid, one trial per value of the method's learning-rate grid (then of its
algorithm's own `tunables`, at the chosen learning rate; the learning-rate trials run with those at
the middle of their grids, `search_start`) runs at a reduced budget
(`TUNE_ROUND_SHARE` of the rounds, and the same share of the centralized epochs, or the share
`--tune-share` gives; a best value at an edge of the grid gets one more trial a step past it),
trained without the held-out rows (`holdout-fraction`, per task) and scored on them: best primary
metric (SST-2 accuracy, CoLA MCC), ties broken by the higher held-out ROC-AUC (a tied trial stored
before AUC was recorded runs again). Trials are ordinary cached cells, so tuning again reuses them
and reaches the same choice; every tried value and its score is returned for the grid's
`results.json`.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedtune.grid import Cell, NotCached, is_cached_only, make_grid, run_cell
from fedtune.config import Settings, key_of
from fedtune.console import say
from fedtune.metrics import primary_metric

# Peak learning rates tried, by the setting a method trains with.
LR_GRID: dict[str, tuple[float, ...]] = {"full_lr": (5e-5, 1e-4, 2e-4), "lora_lr": (1e-3, 3e-3, 1e-2)}
# Plain SGD (`client-optimizer sgd`) takes steps the size of its gradients, not of its learning
# rate, so its rates are larger: about 30x AdamW's.
SGD_LR_GRID: dict[str, tuple[float, ...]] = {"full_lr": (1e-3, 3e-3, 1e-2), "lora_lr": (3e-2, 1e-1, 3e-1)}
# Share of the private rows held out to score trials: SST-2 has ~54,000 private rows (2% is
# ~1,080), CoLA ~6,800 (10% is ~680).
HOLDOUT_FRACTION: dict[str, float] = {"sst2": 0.02, "cola": 0.1}
TUNE_ROUND_SHARE = 0.3  # trials run 3 of 10 rounds
# Short trials favour the rate that learns fastest, which over the whole budget can overshoot
# (SmolLM2 CoLA: 3e-3 won the 0.3 trials and reached dev MCC .118 over two epochs; 5e-4 .339).
# `--tune-share 1` runs each trial at the row's whole budget, at three or four times the cost.


def check_share(share: float) -> float:
    """A share of the row's budget for each tuning trial: in (0, 1]."""
    if not 0 < share <= 1:
        raise ValueError(f"tune-share={share:g}: a tuning trial runs this share of the row's rounds "
                         "(and centralized epochs); give a number in (0, 1], e.g. 0.3 (the default) or 1")
    return share


def _row_algorithm(settings: Settings):
    from fedtune.algorithms import get_algorithm

    return get_algorithm(settings.algorithm, settings)


def lr_setting(settings: Settings, centralized: bool) -> str:
    """The Settings field holding the learning rate this row trains with."""
    if centralized:
        return "full_lr" if settings.method == "finetune" else "lora_lr"
    return _row_algorithm(settings).lr_setting


def search_space(settings: Settings, centralized: bool) -> dict[str, tuple[float, ...]]:
    """What a row tunes, in order: its learning rate, then its algorithm's own settings
    (FedProx's `prox-mu`, FedAdam's `server-lr`)."""
    name = lr_setting(settings, centralized)
    if centralized:
        return {name: LR_GRID[name]}
    grid = SGD_LR_GRID if settings.client_optimizer == "sgd" else LR_GRID
    return {name: grid[name], **_row_algorithm(settings).tunables}


def search_start(settings: Settings, centralized: bool) -> Settings:
    """The row where its coordinate search starts: every setting tuned after the first at the middle
    of its grid. An algorithm's default can belong to another regime (`fedadam-full` shares
    `server-lr` 1e-2 with LoRA's `fedadam`; on the whole model it diverges, and every learning-rate
    trial would diverge with it); the middle of the grid is the value the algorithm declares typical."""
    later = list(search_space(settings, centralized).items())[1:]
    return settings.replace(**{name: grid[len(grid) // 2] for name, grid in later})


def trial_settings(settings: Settings, centralized: bool, name: str, value: float,
                   share: float = TUNE_ROUND_SHARE) -> Settings:
    """A tuning trial of the row `settings`: `name`=`value`, `share` of its budget, scored on the holdout."""
    rounds = max(1, math.floor(share * settings.rounds + 0.5))
    changes = {name: value, "rounds": rounds, "holdout_fraction": HOLDOUT_FRACTION[settings.task]}
    if centralized:
        changes["epochs"] = settings.epochs * rounds / settings.rounds
    return settings.replace(**changes)


def tune_setting(label: str, settings: Settings, centralized: bool, name: str, grid: tuple[float, ...],
                 cells_dir, quiet: bool = False, share: float = TUNE_ROUND_SHARE) -> dict:
    """Try every value of `grid` for the field `name`; the record of the trials and the chosen value."""
    metric = primary_metric(settings.task)

    def run_trial(value: float, refresh: bool = False) -> dict:
        trial = trial_settings(settings, centralized, name, value, share)
        cell = Cell(f"{label} [tune {key_of(name)}={value:g}]", trial, centralized)
        if refresh:  # stored before evaluation recorded ROC-AUC: run it again to have it
            if is_cached_only():
                raise NotCached(f"{cell.label} was stored before evaluation recorded ROC-AUC and would run again")
            (Path(cells_dir) / f"{cell.key}.json").unlink(missing_ok=True)
        result = run_cell(cell, cells_dir, quiet)
        scores = result["summary"]["dev"]  # the run's evaluation set, here the holdout
        return {"value": value, metric: scores[metric], "auc": scores.get("auc"), "loss": scores["loss"],
                "cell": result["key"]}

    def pick(trials: list[dict]) -> dict:
        """The best metric; a tie (CoLA trials all at MCC 0) goes to the higher ROC-AUC, which ranks
        what a model has learned before its predictions leave the majority class."""
        def tied() -> list[dict]:
            top = max(t[metric] for t in trials)
            return [t for t in trials if t[metric] == top]

        if len(tied()) > 1 and any(t["auc"] is None for t in tied()):
            stale = tied()
            trials[:] = [run_trial(t["value"], refresh=True) if t in stale and t["auc"] is None else t for t in trials]
        best = tied()
        if len(best) > 1 and all(t["auc"] is not None for t in best):
            return max(best, key=lambda t: t["auc"])
        return max(best, key=lambda t: -t["loss"])  # no AUC (a task with more than two labels)

    trials = [run_trial(value) for value in grid]
    best = pick(trials)
    # The best at an edge of the grid may not be the best: try one more step past it (same ratio).
    if best["value"] in (grid[0], grid[-1]):
        step = grid[-1] / grid[-2] if best["value"] == grid[-1] else grid[0] / grid[1]
        trials.append(run_trial(float(f"{best['value'] * step:.1g}")))  # 1e-2 * 10/3 -> 3e-2
        trials.sort(key=lambda t: t["value"])
        best = pick(trials)
    trial = trial_settings(settings, centralized, name, best["value"], share)
    say(f"{label}: {key_of(name)}={best['value']:g} (holdout {metric} {best[metric]:.4f})", quiet)
    return {"method": label, "setting": key_of(name), "chosen": best["value"], "metric": metric,
            "scored_on": f"holdout-fraction={trial.holdout_fraction} of the private train rows (not GLUE dev)",
            "rounds": trial.rounds, "epochs": trial.epochs if centralized else None, "seed": settings.seed,
            "trials": trials}


def tune_row(label: str, settings: Settings, centralized: bool, cells_dir, quiet: bool = False,
             share: float = TUNE_ROUND_SHARE) -> list[dict]:
    """Tune the row's settings one after another (coordinate search from `search_start`): the
    learning rate first, then each of its algorithm's own settings at the chosen learning rate.
    One record each."""
    records = []
    settings = search_start(settings, centralized)
    for name, grid in search_space(settings, centralized).items():
        records.append(tune_setting(label, settings, centralized, name, grid, cells_dir, quiet, share))
        settings = settings.replace(**{name: records[-1]["chosen"]})
    return records


def first_trials(base: Settings, methods: list[str] | None, remedy_names: list[str] | None = None,
                 share: float = TUNE_ROUND_SHARE, only: set[str] | None = None) -> list[Cell]:
    """The trials `tune_methods` runs first whatever they score (each row's first setting over its
    whole grid), so that they can run side by side (`grid.run_cells`) before the search reads them."""
    trials = []
    for cell in make_grid(base, seeds=1, methods=methods, remedy_names=remedy_names, only=only):
        start = search_start(cell.settings, cell.centralized)
        name, grid = next(iter(search_space(start, cell.centralized).items()))
        trials += [Cell(f"{cell.label} [tune {key_of(name)}={value:g}]",
                        trial_settings(start, cell.centralized, name, value, share), cell.centralized)
                   for value in grid]
    return trials


def tune_methods(base: Settings, methods: list[str] | None, cells_dir, quiet: bool = False,
                 remedy_names: list[str] | None = None, share: float = TUNE_ROUND_SHARE,
                 only: set[str] | None = None) -> list[dict]:
    """Tune every row of the grid (or the rows in `methods`, with `remedy_names`; of those, the
    ones labelled in `only`) on `base`'s first seed, each trial at `share` of the row's budget."""
    tuned = []
    for cell in make_grid(base, seeds=1, methods=methods, remedy_names=remedy_names, only=only):
        tuned += tune_row(cell.label, cell.settings, cell.centralized, cells_dir, quiet, share)
    return tuned


def chosen_values(tuning: list[dict]) -> dict[str, dict]:
    """{row label: {field: chosen value, ...}}, what `make_grid` applies to a row's cells."""
    chosen: dict[str, dict] = {}
    for t in tuning:
        chosen.setdefault(t["method"], {})[t["setting"].replace("-", "_")] = t["chosen"]
    return chosen
