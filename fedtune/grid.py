"""The grid's cells: one run (a method and a seed) each, cached on disk by its settings.

A finished cell is stored as `<out-dir>/compare/cells/<key>.json`, keyed by a hash of its
resolved settings, so a rerun reuses it and an interrupted grid resumes where it stopped.
Cells of all grids share one folder: a Dirichlet grid reuses the IID grid's centralized
cells, and all KD cells of a seed share one pre-trained teacher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from fedtune.config import Settings, federated_only
from fedtune.console import say, warn
from fedtune.runs import read_jsonl, write_json

CENTRALIZED_ROWS: list[tuple[str, dict]] = [("Finetune", {"method": "finetune"}), ("KD", {"method": "kd"}),
                                            ("LoRA", {"method": "lora"})]


def grid_rows() -> list[tuple[str, dict]]:
    """(row label, changes to the base settings), centralized rows first, then each registered
    algorithm's `rows` in registration order; `method` rows are centralized, `algorithm` federated."""
    from fedtune.algorithms import registered

    return CENTRALIZED_ROWS + [(label, {"algorithm": name, **changes}) for name, cls in registered().items()
                               for label, changes in cls.rows]


def remedies() -> dict[str, dict]:
    """What `compare --remedies` can add to each federated row: name -> settings changes. Every
    registered client loss; `equal-steps`: every client the same number of local steps (the
    mean client's, so the federation trains on as many rows as without it) and uniform weights;
    `scaffold`: SCAFFOLD's control variates (`scaffold-grad`: c_i the mean raw gradient); `server-finetune`: the server trains the global model
    on the public slice after every round, as many steps as the mean client (the server-data baseline);
    `ccvr`: the classifier retrained after the last round from the clients' feature statistics;
    `ccvr-lda`: set from them in closed form; `lda-init`: the classifier set that way before round 1,
    from the initial model's features; `freeze-head`: clients never train the classifier (FedBABU);
    `sgd`: clients train with plain SGD instead of AdamW; `server-momentum`: FedAvgM with momentum 0.9
    (Hsu et al. 2019's best at strong skew; the client learning rate is tuned as for every row);
    `fednova`: FedNova's normalized averaging (each update divided by its client's local steps);
    `swa`: the final model the mean of the last quarter of the rounds' global models (rounds // 4, at
    least 1: FedSWA averages from 75% of training on)."""
    from fedtune.client_losses import registered

    return {**{name: {"client_loss": name} for name in registered() if name != "none"},
            "equal-steps": {"client_weighting": "uniform", "local_steps": "mean client"},
            "scaffold": {"scaffold": 1}, "scaffold-grad": {"scaffold": 1, "scaffold_variate": "mean-gradient"},
            "server-finetune": {"server_finetune_steps": "mean client"},
            "ccvr": {"classifier_calibration": "ccvr"}, "ccvr-lda": {"classifier_calibration": "ccvr-lda"},
            "lda-init": {"classifier_init": "lda"}, "freeze-head": {"freeze_head": 1},
            "sgd": {"client_optimizer": "sgd"}, "server-momentum": {"server_momentum": 0.9},
            "fednova": {"fednova": 1}, "swa": {"swa_rounds": "last quarter"}}


def remedy_settings(name: str) -> dict:
    """The settings changes of remedy `name`; `a+b` combines remedies that change different
    settings (e.g. `feddecorr+ccvr-lda`: a client loss, then the calibration after the last round)."""
    known, changes = remedies(), {}
    for part in name.split("+"):
        if part not in known:
            raise ValueError(f"unknown remedy {part!r} (known: {', '.join(known)}; join two with '+')")
        if clash := set(changes) & set(known[part]):
            raise ValueError(f"remedy {name!r}: {part!r} sets {', '.join(sorted(clash))} again; combine remedies "
                             f"that change different settings")
        changes.update(known[part])
    return changes


def remedy_changes(name: str, settings: Settings) -> dict:
    """The settings changes of remedy `name` for a row with `settings`."""
    special = {"mean client": lambda: mean_client_steps(settings), "last quarter": lambda: max(1, settings.rounds // 4)}
    return {k: special[v]() if v in special else v for k, v in remedy_settings(name).items()}


def mean_client_steps(settings: Settings) -> int:
    """Local steps of a client holding the mean partition (private rows / clients) at `local-epochs`."""
    import math

    from fedtune.data import cached_task_data
    from fedtune.train import steps_for

    rows = math.ceil(len(cached_task_data(settings).private) / settings.clients)
    return steps_for(math.ceil(rows / settings.batch_size), settings.local_epochs)
SWEEP_RANKS = (4, 8, 16, 32)

# Settings a centralized run does not read (marked in Settings): normalised before hashing so grids share those cells.
FEDERATED_ONLY = federated_only()
# Settings that choose how a run executes, not what it computes (the engines' per-round metrics are
# tested equal, batched clients equal to float tolerance; the client shares only schedule Ray actors):
# cells computed either way are the same cell.
EXECUTION_ONLY = ("engine", "client-cpus", "client-gpus", "batched-clients")


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
                  if v != defaults[k] and k != "out-dir" and k not in EXECUTION_ONLY and k != "precision"}
        # The precision the cell computes in, as resolved here (`auto` is bf16 on some CPUs): fp32
        # cells keep the keys they had before `auto` could mean bf16.
        if (precision := training_precision(settings)) != "fp32":
            values["precision"] = precision
        values["kind"] = "centralized" if self.centralized else "federated"
        if not self.centralized:  # an algorithm whose maths changed gets new cells (old keys stay valid for v1)
            from fedtune.algorithms import get_algorithm

            if (version := get_algorithm(settings.algorithm, settings).version) != 1:
                values["algorithm-version"] = version
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def training_precision(settings: Settings) -> str:
    from fedtune.devices import compute

    return compute(settings.device, settings.precision, settings.models)[1]


def make_grid(base: Settings, seeds: int, rank_sweep: bool = False, methods: list[str] | None = None,
              tuned: dict[str, dict] | None = None, remedy_names: list[str] | None = None,
              only: set[str] | None = None) -> list[Cell]:
    """Every (method, seed) cell. Centralized cells train rounds x local-epochs epochs: the
    federation's total budget. `remedy_names` add, after each federated row, the row with each
    remedy (labelled "<row> + <remedy>"). `tuned` adds per-row changes (the chosen learning rates).
    `only`: keep just the rows with these labels."""
    tuned = tuned or {}
    # `methods` names rows: a base row's label, or a remedied row's ("Fed-LoRA + fedlc"); naming any
    # remedied row keeps only the remedied rows named
    named_variants = {m for m in methods or () if " + " in m}
    bases = {m.split(" + ")[0] for m in named_variants}
    rows = [(label, changes) for label, changes in grid_rows()
            if methods is None or label in methods or label in bases]
    if remedy_names:
        rows = [variant for label, changes in rows for variant in
                ([(label, changes)] if methods is None or label in methods else [])
                + ([] if "method" in changes else
                   [(f"{label} + {name}", {**changes, **remedy_changes(name, base)}) for name in remedy_names
                    if not named_variants or f"{label} + {name}" in named_variants])]
    rows = [(label, {**changes, **tuned.get(label, {})}) for label, changes in rows]
    if rank_sweep:
        rows += [(f"{name} r={r}", {"algorithm": algorithm, "lora_r": r})
                 for r in SWEEP_RANKS for name, algorithm in (("Fed-LoRA", "fedlora"), ("Fed-LoRA-KD", "fedkdlora"))]
    base = base.replace(epochs=base.rounds * base.local_epochs)
    return [Cell(label, base.replace(seed=base.seed + i, **changes), "method" in changes)
            for label, changes in rows if only is None or label in only for i in range(seeds)]


def read_cell(path: Path) -> dict:
    """A cached cell, checked: what the tables read is there with the right types, or one error
    naming the file (delete it and the grid runs the cell again)."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    try:
        cell = json.loads(path.read_text(encoding="utf-8"))
        problem = None
        if not isinstance(cell, dict):
            problem = "not a JSON object"
        elif not isinstance(cell.get("settings"), dict) or not isinstance(cell.get("rounds"), list):
            problem = "'settings' or 'rounds' missing"
        elif not isinstance(cell.get("summary"), dict) or not isinstance(cell["summary"].get("dev"), dict):
            problem = "'summary' with its 'dev' metrics missing"
        elif not all(number(v) for v in cell["summary"]["dev"].values()) or not number(cell.get("wall_seconds")):
            problem = "a metric or wall_seconds is not a number"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problem = f"unreadable: {err}"
    if problem:
        raise ValueError(f"cached cell {path} is damaged ({problem}); delete it and the grid runs the cell again")
    return cell


def check_rounds(cell: Cell, rounds: list[dict], path: Path) -> None:
    """Refuse to store a federated cell in which a round kept no client's reply (the model did
    not change that round), unless the cell simulates dropouts: it would enter the table as a
    measurement of the method when it measures a failure."""
    if cell.settings.dropout > 0:
        return
    for record in rounds[1:]:
        if record["accepted"] == 0:
            reasons = sorted({d["reason"] for d in record["dropped"]}) or ["no reply"]
            raise RuntimeError(f"{cell.label} (seed {cell.settings.seed}): no client reply was usable in round "
                               f"{record['round']} ({'; '.join(reasons)[:500]}); not cached. Run folder: {path}")


def interrupted_run(settings: Settings) -> Path | None:
    """The newest interrupted run of exactly these settings under `out-dir` that has a checkpoint
    (Ctrl-C or a crash inside a cell): the grid resumes it instead of starting the cell again.
    Interrupted runs of these settings without a checkpoint (stopped before round 0 finished) are
    removed. A run another process is still writing (`runs.in_use`: a grid killed while its cells'
    processes ran on) is neither resumed nor removed."""
    import shutil

    from fedtune.checkpoint import has_checkpoint
    from fedtune.runs import INCOMPLETE, in_use, read_config

    wanted = {k: v for k, v in settings.to_dict().items() if k != "resume"}
    found = []
    for folder in sorted(Path(settings.out_dir).glob(f"{settings.algorithm}-{settings.task}-*{INCOMPLETE}")):
        try:
            config = read_config(folder / "config.json")
        except (ValueError, FileNotFoundError):
            continue  # not a run of ours: left alone
        if {k: v for k, v in config.items() if k != "resume"} != wanted:
            continue
        if in_use(folder):
            warn(f"{folder} runs these settings in another process that is still writing it: left to it, "
                 f"and this cell starts anew")
            continue
        if has_checkpoint(folder):
            found.append(folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return found[-1] if found else None


class NotCached(LookupError):
    """A cell that is not finished, met while `cached_only()` forbids running it."""


_CACHED_ONLY: ContextVar[bool] = ContextVar("cached_only", default=False)


@contextlib.contextmanager
def cached_only() -> Iterator[None]:
    """While inside, `run_cell` only reads finished cells: one that is not cached raises
    `NotCached` instead of running (`compare --cached-only`)."""
    token = _CACHED_ONLY.set(True)
    try:
        yield
    finally:
        _CACHED_ONLY.reset(token)


def is_cached_only() -> bool:
    return _CACHED_ONLY.get()


def run_cells(cells: list[Cell], cells_dir: Path, quiet: bool, jobs: int = 1) -> list[dict]:
    """Each cell's result, in order (`run_cell`). With `jobs` > 1 the cells not cached yet run that
    many at a time, each in a process of its own with its share of this process's CPU threads
    (the results are the same to float error: a cell's run depends only on its settings, and the
    thread count changes only the order of float sums; tested to 1e-4); the teachers they need are
    trained first, here, so that no two processes train the same one."""
    if jobs > 1 and not is_cached_only():
        import concurrent.futures
        import multiprocessing

        import torch

        pending = {c.key: c for c in cells if not (cells_dir / f"{c.key}.json").is_file()}
        for cell in pending.values():
            if needs_teacher(cell):
                from fedtune.teacher import pretrain_teacher

                pretrain_teacher(cell.settings.replace(out_dir=str(cells_dir)), quiet)
        if pending:
            jobs = min(jobs, len(pending))  # one pending cell gets every thread, not a job's share
            threads = max(1, torch.get_num_threads() // jobs)
            say(f"running {len(pending)} cells, {jobs} at a time ({threads} CPU threads each)", quiet)
            context = multiprocessing.get_context("spawn")
            try:
                with concurrent.futures.ProcessPoolExecutor(jobs, context, initializer=_worker,
                                                            initargs=(threads,)) as pool:
                    longest_first = sorted(pending.values(), key=relative_cost, reverse=True)  # a stable sort
                    for done in [pool.submit(run_cell, cell, cells_dir, True) for cell in longest_first]:
                        done.result()  # the first error ends the grid, with its message
            except KeyboardInterrupt:
                from fedtune.runs import ELSEWHERE

                ELSEWHERE.append(f"fedtune: interrupted; {RESUMED.format(cells_dir)}")
                raise
            except concurrent.futures.process.BrokenProcessPool:  # Ctrl-C reached the workers first, or a kill
                raise RuntimeError(f"a cell's process stopped (Ctrl-C, or killed: out of memory?); "
                                   f"{RESUMED.format(cells_dir)}") from None
    return [run_cell(cell, cells_dir, quiet) for cell in cells]


RESUMED = "the cells that had checkpointed a round (*.incomplete in {}) continue when the same command runs again"


def _worker(threads: int) -> None:
    """A `run_cells` process: its share of the threads; what it writes is the cell's file. It
    ends when the process that started it is gone (`_end_with_parent`)."""
    import torch

    from fedtune.console import quiet_libraries

    torch.set_num_threads(threads)
    quiet_libraries()
    threading.Thread(target=_end_with_parent, args=(os.getppid(),), daemon=True, name="end-with-parent").start()


def _end_with_parent(parent: int, every: float = 1.0) -> None:
    """Exit this process once `parent` is no longer its parent (killed without Ctrl-C: the pool's
    workers would otherwise run their cells on, unseen, and a rerun of the grid would find their
    folders). What the cell has checkpointed stays for the rerun; a run without a checkpoint is removed."""
    while os.getppid() == parent:
        time.sleep(every)
    from fedtune.runs import ACTIVE, discard_unstarted

    for run in list(ACTIVE):
        discard_unstarted(run)
    os._exit(1)


def relative_cost(cell: Cell) -> int:
    """About how long the cell takes, in units of a LoRA cell of its grid: 2 where every weight
    trains (FedAvg-like rows, centralized fine-tuning) or every client trains a teacher of its own,
    1 otherwise (the standard SST-2 grid: 7.5-11.3 min against 3.1-5.5: docs/benchmarks.md). Side
    by side cells start longest first, so that a long one does not start last and run alone."""
    if cell.centralized:
        return 2 if cell.settings.method == "finetune" else 1
    from fedtune.algorithms import get_algorithm

    algorithm = get_algorithm(cell.settings.algorithm, cell.settings)
    return 2 if algorithm.lr_setting == "full_lr" or algorithm.teacher_on_client else 1


def needs_teacher(cell: Cell) -> bool:
    """Whether the cell distils from a teacher pre-trained on the public slice (cached per settings)."""
    if cell.centralized:
        return cell.settings.method == "kd"
    from fedtune.algorithms import get_algorithm

    return get_algorithm(cell.settings.algorithm, cell.settings).needs_teacher


def run_cell(cell: Cell, cells_dir: Path, quiet: bool) -> dict:
    """The cell's result, from the cache or from running it now."""
    cached = cells_dir / f"{cell.key}.json"
    if cached.is_file():
        say(f"reusing {cell.label} (seed {cell.settings.seed}): {cached}", quiet)
        # Another row may have computed it (Fed-LoRA is the rank sweep's Fed-LoRA r=8): label it as this row.
        return {**read_cell(cached), "label": cell.label}
    if is_cached_only():
        raise NotCached(f"{cell.label} (seed {cell.settings.seed}) is not finished (cell {cell.key})")
    say(f"[bold]{cell.label}[/] (seed {cell.settings.seed})", quiet)
    settings = cell.settings.replace(out_dir=str(cells_dir))
    start = time.perf_counter()
    if cell.centralized:
        from fedtune.centralized import run_centralized

        path = run_centralized(settings, quiet)
        rounds = []
    else:
        from fedtune.checkpoint import CheckpointError
        from fedtune.simulation import run_federated

        interrupted = interrupted_run(settings)
        path = None
        if interrupted:
            say(f"resuming the interrupted cell {interrupted}", quiet)
            try:
                path = run_federated(settings.replace(resume=str(interrupted)), quiet)
            except CheckpointError as err:  # a damaged checkpoint, a teacher trained since: a cell is only
                # its settings, so it starts anew; the folder is left for the user to look at
                warn(f"{cell.label} (seed {settings.seed}) not resumed: {err}. The cell starts anew; "
                     f"{interrupted} is left as it is (delete it when done with it)")
        path = path or run_federated(settings, quiet)
        rounds = read_jsonl(path / "rounds.jsonl")
        check_rounds(cell, rounds, path)
    result = {"label": cell.label, "seed": settings.seed, "key": cell.key, "run": str(path),
              "wall_seconds": time.perf_counter() - start, "settings": settings.to_dict(),
              "summary": json.loads((path / "summary.json").read_text()), "rounds": rounds}
    write_json(cached, result)
    return result
