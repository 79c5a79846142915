"""The comparison grid on a tiny model: table, plots and JSON; finished cells are reused."""

import json
from pathlib import Path

import pytest

import fedtune.centralized
import fedtune.simulation
from fedtune.compare import make_grid, preset_settings, run_compare


def must_not_run(*args, **kwargs):
    raise AssertionError("a finished cell was recomputed")


@pytest.fixture(scope="module")
def base(tiny_bert, glue_dir, tmp_path_factory):
    given = {"task": "cola", "glue-dir": str(glue_dir), "model": tiny_bert, "clients": 2, "rounds": 2,
             "train-limit": 40, "eval-limit": 32, "batch-size": 8, "max-length": 32, "local-steps": 2, "lora-r": 2,
             "out-dir": str(tmp_path_factory.mktemp("compare"))}
    return preset_settings("small", given)


def test_flags_override_the_preset(base):
    assert base.train_limit == 40 and base.lora_lr == 3e-3  # given, and from the preset
    with pytest.raises(ValueError, match="unknown preset"):
        preset_settings("huge")


def test_small_preset_gives_cola_a_larger_budget_than_sst2(tmp_path):
    from fedtune.cli import build_parser, settings_from_args

    sst2, cola = preset_settings("small"), preset_settings("small", {"task": "cola"})
    assert (sst2.train_limit, sst2.full_lr, sst2.batching) == (1000, 5e-5, "random")
    assert (cola.train_limit, cola.full_lr, cola.batching) == (0, 1e-4, "by-length")
    assert cola.rounds == sst2.rounds and cola.lora_lr == sst2.lora_lr  # the rest of the budget is shared
    # The CLI finds the task in the flags or in the TOML file; a flag still beats the preset.
    config = tmp_path / "cola.toml"
    config.write_text('task = "cola"\n')
    for argv, limit in ((["compare", "--task", "cola"], 0), (["compare", "--config", str(config)], 0),
                        (["compare", "--task", "cola", "--train-limit", "500"], 500), (["compare"], 1000)):
        assert settings_from_args(build_parser().parse_args(argv)).train_limit == limit, argv


def test_grid_gives_centralized_methods_the_federated_budget(base):
    cells = make_grid(base.replace(local_epochs=0.5, rounds=4), seeds=2)
    assert len(cells) == 16 * 2  # 3 centralized + 13 federated rows, 2 seeds
    lora = [c for c in cells if c.label == "LoRA"]
    assert [c.settings.seed for c in lora] == [base.seed, base.seed + 1] and lora[0].settings.epochs == 2.0
    # Centralized cells ignore federated settings, so IID and Dirichlet grids share them.
    dirichlet = make_grid(base.replace(local_epochs=0.5, rounds=4, partition="dirichlet"), seeds=2)
    assert [c.key for c in cells if c.centralized] == [c.key for c in dirichlet if c.centralized]
    assert [c.key for c in cells if not c.centralized] != [c.key for c in dirichlet if not c.centralized]


@pytest.mark.slow
def test_grid_writes_table_plots_json_and_reuses_cells(base, monkeypatch):
    methods = ["LoRA", "Fed-LoRA"]
    folder = run_compare(base, "small", seeds=1, methods=methods, quiet=True)
    for name in ("table.md", "results.json", "metric-vs-round.png", "metric-vs-mb.png"):
        assert (folder / name).is_file(), name
    results = json.loads((folder / "results.json").read_text())
    assert [r["method"] for r in results["table"]] == methods
    fed = next(c for c in results["cells"] if c["label"] == "Fed-LoRA")
    assert [r["round"] for r in fed["rounds"]] == [0, 1, 2]
    table = (folder / "table.md").read_text()
    assert "| LoRA | 1 |" in table and "MCC" in table and "MB up / round" in table
    assert "| Fed-LoRA | " in (folder.parent / "iid-small.md").read_text()  # the method x task table

    monkeypatch.setattr(fedtune.simulation, "run_federated", must_not_run)
    monkeypatch.setattr(fedtune.centralized, "run_centralized", must_not_run)
    again = json.loads((run_compare(base, "small", seeds=1, methods=methods, quiet=True) / "results.json").read_text())
    assert again["cells"] == results["cells"]


def test_rank_sweep_adds_fedlora_and_fedkdlora_at_ranks_4_to_32():
    from fedtune.config import Settings

    cells = make_grid(Settings(), seeds=2, rank_sweep=True, methods=["Fed-LoRA"])
    sweep = [c for c in cells if " r=" in c.label]
    assert sorted({(c.settings.algorithm, c.settings.lora_r) for c in sweep}) == [
        (algorithm, r) for algorithm in ("fedkdlora", "fedlora") for r in (4, 8, 16, 32)]
    assert len(sweep) == 16 and {c.settings.seed for c in sweep} == {42, 43}  # two seeds per (method, rank)
    # Fed-LoRA at the default rank is the same configuration as its sweep cell: computed once, reused.
    default = f"Fed-LoRA r={Settings().lora_r}"
    assert {c.key for c in cells if c.label == "Fed-LoRA"} == {c.key for c in sweep if c.label == default}
    assert len({c.key for c in cells}) == len(cells) - 2


def _finished_cell(cell, mcc: float) -> dict:
    """A cached cell as `run_cell` stores it, with made-up numbers (nothing is trained)."""
    rounds = [{"round": i, "dev_mcc": mcc * i / 2, "cum_bytes_up": 1000 * cell.settings.lora_r * i,
               "cum_bytes_down": 0} for i in range(3)]
    summary = {"dev": {"mcc": mcc, "accuracy": 0.7}, "rounds": 2, "total_bytes_up": rounds[-1]["cum_bytes_up"],
               "total_bytes_down": 0}
    return {"label": "stored under another row", "seed": cell.settings.seed, "key": cell.key, "run": "-",
            "wall_seconds": 1.0, "settings": cell.settings.to_dict(), "summary": summary, "rounds": rounds}


def test_rank_sweep_reuses_cells_under_its_own_labels_and_plots_metric_vs_rank(base, monkeypatch):
    sweep_base = base.replace(lora_r=8, out_dir=base.out_dir + "-sweep")  # Fed-LoRA is also Fed-LoRA r=8
    cells = make_grid(sweep_base, seeds=1, rank_sweep=True, methods=["Fed-LoRA"])
    cells_dir = Path(sweep_base.out_dir) / "compare" / "cells"
    cells_dir.mkdir(parents=True)
    for cell in cells:  # MCC grows with the rank: 0.04 r=4 ... 0.32 r=32
        (cells_dir / f"{cell.key}.json").write_text(json.dumps(_finished_cell(cell, cell.settings.lora_r / 100)))

    monkeypatch.setattr(fedtune.simulation, "run_federated", must_not_run)
    folder = run_compare(sweep_base, "small", seeds=1, rank_sweep=True, methods=["Fed-LoRA"], quiet=True)
    assert folder.name == "cola-iid-small-ranks" and (folder / "metric-vs-rank.png").is_file()
    rows = {r["method"]: r for r in json.loads((folder / "results.json").read_text())["table"]}
    assert list(rows) == ["Fed-LoRA"] + [f"{m} r={r}" for r in (4, 8, 16, 32) for m in ("Fed-LoRA", "Fed-LoRA-KD")]
    assert rows["Fed-LoRA r=32"]["MCC"] == {"mean": 0.32, "std": 0.0, "values": [0.32]}  # numbers, not text
    assert len({c.key for c in cells}) == len(cells) - 1
    assert rows["Fed-LoRA"]["MCC"] == rows["Fed-LoRA r=8"]["MCC"] == {"mean": 0.08, "std": 0.0, "values": [0.08]}
    assert rows["Fed-LoRA r=8"]["MB up / round"] == "0.008"  # 16,000 bytes over 2 rounds


def test_seed_table_puts_each_task_in_its_own_columns(tmp_path):
    from fedtune.compare import seed_table

    grids = {"cola": [{"method": "Fed-LoRA", "MCC": "0.2000 ± 0.0100", "accuracy": "0.7000 ± 0.0000",
                       "MB up / round": "1.249"}],
             "sst2": [{"method": "Fed-LoRA", "accuracy": "0.8000 ± 0.0200", "MB up / round": "1.249"},
                      {"method": "LoRA", "accuracy": "0.8500 ± 0.0000", "MB up / round": "-"}]}
    for task, rows in grids.items():
        (tmp_path / f"{task}-iid-small").mkdir()
        (tmp_path / f"{task}-iid-small" / "results.json").write_text(json.dumps({"seeds": 2, "table": rows}))
    lines = seed_table(tmp_path, "iid", "small").splitlines()
    assert lines[0] == ("| method | CoLA MCC (2 seeds) | CoLA accuracy (2 seeds) | SST-2 accuracy (2 seeds) "
                        "| MB up / round |")
    # Rows in the grid's order (centralized LoRA before Fed-LoRA); a task without the method shows "-".
    assert lines[2:] == ["| LoRA | - | - | 0.8500 ± 0.0000 | - |",
                         "| Fed-LoRA | 0.2000 ± 0.0100 | 0.7000 ± 0.0000 | 0.8000 ± 0.0200 | 1.249 |"]


def test_seed_table_of_another_dirichlet_alpha_reads_its_own_grids(tmp_path):
    from fedtune.compare import partition_name, seed_table
    from fedtune.config import Settings

    assert partition_name(Settings(partition="dirichlet", dirichlet_alpha=0.5)) == "dirichlet0.5"
    assert seed_table(tmp_path, "dirichlet0.5", "standard") == "(no rows)"  # nothing finished yet: no crash
    (tmp_path / "sst2-dirichlet0.5-standard").mkdir()
    rows = [{"method": "Fed-LoRA", "accuracy": {"mean": 0.61, "std": 0.0, "values": [0.61]}, "MB up / round": 1.249}]
    (tmp_path / "sst2-dirichlet0.5-standard" / "results.json").write_text(json.dumps({"seeds": 1, "table": rows}))
    assert seed_table(tmp_path, "dirichlet0.5", "standard").splitlines()[2].startswith("| Fed-LoRA | 0.6100")


def test_a_cell_whose_round_kept_no_reply_is_refused_not_cached(base):
    from fedtune.grid import check_rounds

    cell = make_grid(base, seeds=1, methods=["Fed-LoRA"])[0]
    good = [{"round": 0, "accepted": 0, "dropped": []}, {"round": 1, "accepted": 2, "dropped": []}]
    check_rounds(cell, good, Path("run"))
    failed = good + [{"round": 2, "accepted": 0, "dropped": [{"node": 1, "reason": "client error: boom"}] * 2}]
    with pytest.raises(RuntimeError, match="no client reply was usable in round 2 \\(client error: boom\\)"):
        check_rounds(cell, failed, Path("run"))
    check_rounds(make_grid(base.replace(dropout=0.5), seeds=1, methods=["Fed-LoRA"])[0], failed, Path("run"))


def test_an_algorithm_whose_maths_changed_does_not_reuse_old_cells(base, monkeypatch):
    from fedtune.algorithms.hetlora import HetLoRA

    [cell] = make_grid(base, seeds=1, methods=["HetLoRA"])
    key = cell.key
    monkeypatch.setattr(HetLoRA, "version", HetLoRA.version + 1)
    assert cell.key != key


def test_centralized_cells_ignore_every_federated_only_setting(base):
    from fedtune.config import federated_only

    old_list = {"algorithm", "clients", "rounds", "fraction_train", "local_epochs", "local_steps", "partition",
                "dirichlet_alpha", "classes_per_client", "min_partition_size", "round_timeout", "rank_distribution",
                "rank_set", "client_ranks", "kd_placement", "kd_server_steps", "codec", "svd_energy_start",
                "svd_energy_end"}  # the hand-kept list this replaced
    assert old_list <= set(federated_only()) and "lora_lr" not in federated_only()
    [lora] = make_grid(base, seeds=1, methods=["LoRA"])
    for changes in ({"prox_mu": 0.5}, {"server_lr": 0.5}, {"codec": "fp16"}, {"dp_clip": 3.0}, {"hetlora_rescale": 0}):
        [changed] = make_grid(base.replace(**changes), seeds=1, methods=["LoRA"])
        assert changed.key == lora.key, changes
    assert make_grid(base.replace(lora_lr=0.5), seeds=1, methods=["LoRA"])[0].key != lora.key


def test_the_engine_and_client_shares_do_not_make_new_cells(base):
    # The engines' per-round metrics are tested equal (test_simulation), so a grid may resume on either.
    [cell] = make_grid(base, seeds=1, methods=["Fed-LoRA"])
    for changes in ({"engine": "local"}, {"client_cpus": 1}, {"client_gpus": 0.25}):
        assert make_grid(base.replace(**changes), seeds=1, methods=["Fed-LoRA"])[0].key == cell.key, changes
    assert make_grid(base.replace(rounds=base.rounds + 1), seeds=1, methods=["Fed-LoRA"])[0].key != cell.key


def test_line_styles_of_a_fourteen_row_grid_are_all_distinct():
    from fedtune.plots import line_style

    for lines in (3, 10, 14, 20):
        styles = [line_style(i, lines) for i in range(lines)]
        assert len({tuple(c) for c, _ in styles}) == lines  # distinct colours, not only markers


def test_a_cell_interrupted_inside_a_round_is_resumed_not_recomputed(base, interrupt_after_round):
    """Ctrl-C inside a federated cell leaves `<cell>.incomplete` with a checkpoint: the next
    `compare` continues it (the Ctrl-C message and the grid agree) and gets the uninterrupted
    result; an interrupted folder without a checkpoint is cleaned up."""
    from fedtune.grid import Cell, run_cell
    from fedtune.runs import read_jsonl

    settings = base.replace(algorithm="fedlora", out_dir=str(Path(base.out_dir) / "interrupted"), engine="local")
    cells_dir = Path(settings.out_dir)
    interrupt_after_round(1)
    cell = Cell("Fed-LoRA", settings, centralized=False)
    with pytest.raises(KeyboardInterrupt):
        run_cell(cell, cells_dir, quiet=True)
    [interrupted] = cells_dir.glob("fedlora-cola-*.incomplete")
    stale = cells_dir / "fedlora-cola-20000101-000000.incomplete"  # stopped before round 0 finished
    stale.mkdir()
    (stale / "config.json").write_text(json.dumps(settings.to_dict()))
    resumed = run_cell(cell, cells_dir, quiet=True)
    assert resumed["run"] == str(interrupted).removesuffix(".incomplete") and not stale.exists()
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2]
    (cells_dir / f"{cell.key}.json").unlink()
    again = run_cell(cell, cells_dir, quiet=True)  # from scratch, uninterrupted
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k and k != "elapsed" and "bytes" not in k}
                        for r in rs]  # noqa: E731
    assert strip(again["rounds"]) == strip(read_jsonl(Path(resumed["run"]) / "rounds.jsonl"))


@pytest.mark.slow
def test_a_cell_whose_checkpoint_cannot_be_resumed_starts_anew(base, interrupt_after_round, capsys):
    """A damaged checkpoint in an interrupted cell does not stop the grid: one warning names the
    cell and the folder, which is left as it is, and the cell runs anew to the uninterrupted result."""
    from fedtune.grid import Cell, run_cell

    settings = base.replace(algorithm="fedlora", out_dir=str(Path(base.out_dir) / "damaged"), engine="local")
    cells_dir = Path(settings.out_dir)
    cell = Cell("Fed-LoRA", settings, centralized=False)
    interrupt_after_round(1)
    with pytest.raises(KeyboardInterrupt):
        run_cell(cell, cells_dir, quiet=True)
    [interrupted] = cells_dir.glob("fedlora-cola-*.incomplete")
    (interrupted / "checkpoint.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    capsys.readouterr()
    result = run_cell(cell, cells_dir, quiet=True)
    err = "".join(capsys.readouterr().err.split())  # without the terminal's line breaks
    assert "warning:Fed-LoRA(seed42)notresumed:" in err and "isnotafedtunecheckpoint" in err
    assert f"{interrupted}isleftasitis" in err
    assert interrupted.is_dir() and result["run"] != str(interrupted).removesuffix(".incomplete")
    assert [r["round"] for r in result["rounds"]] == [0, 1, 2]


def test_every_row_has_the_skew_columns_when_any_cell_recorded_them():
    from fedtune.compare import markdown, table
    from fedtune.config import Settings

    old = {"label": "Fed-LoRA", "settings": Settings(algorithm="fedlora").to_dict(), "wall_seconds": 1.0,
           "summary": {"rounds": 10, "dev": {"accuracy": 0.5092}, "total_bytes_up": 1e6, "total_bytes_down": 1e6}}
    new = {**old, "label": "Fed-LoRA + fedlc",
           "summary": {**old["summary"], "dev": {"accuracy": 0.49, "balanced_accuracy": 0.5, "worst_class_recall": 0.0}}}
    rows = table([old, new], "sst2")
    assert [list(r) for r in rows][0] == list(rows[1]) and rows[0]["balanced acc"] is None
    assert "| Fed-LoRA | 1 | 0.5092 ± 0.0000 | - | - |" in markdown(rows)
    assert rows[1]["worst-class recall"] == {"mean": 0.0, "std": 0.0, "values": [0.0]}


def test_an_earlier_row_reused_from_a_cell_stored_with_auto_stays_in_an_fp32_grid(tmp_path, monkeypatch, capsys):
    """A cell made when `auto` meant fp32 keeps `precision: auto` in its stored settings; an fp32 grid
    that reused it from the cache (its key is the fp32 key) keeps its row when gathered again on a
    host whose `auto` is bf16 now. A bf16 cell in the same file is not this grid's and is left out."""
    import fedtune.devices
    from fedtune.compare import with_earlier_rows
    from fedtune.config import Settings
    from fedtune.grid import Cell

    monkeypatch.setattr(fedtune.devices, "cpu_bf16_pays", lambda: True)
    grid = Settings(algorithm="fedlora", device="cpu", precision="fp32")
    fp32_key = Cell("Fed-LoRA", grid, False).key
    old = grid.replace(precision="auto")
    assert Cell("Fed-LoRA", old, False).key != fp32_key  # `auto` is bf16 here now
    bf16 = grid.replace(precision="bf16")
    cells = [{"label": "Fed-LoRA", "key": fp32_key, "settings": old.to_dict(), "rounds": [{"round": 0}]},
             {"label": "FedProx", "key": Cell("FedProx", bf16, False).key, "settings": bf16.to_dict(),
              "rounds": [{"round": 0}]}]
    header = {"task": "sst2", "settings": grid.to_dict()}
    (tmp_path / "results.json").write_text(json.dumps({**header, "cells": cells, "tuning": []}))
    kept, _ = with_earlier_rows(tmp_path / "results.json", header, [], [])
    assert [c["label"] for c in kept] == ["Fed-LoRA"]
    assert "1 earlier row(s) left out" in capsys.readouterr().err


@pytest.mark.slow
def test_rows_run_one_invocation_at_a_time_add_up_to_one_table(base, tmp_path, capsys):
    """A grid run row by row (as long grids are) ends with one table of every row, in the grid's
    order; a row run again replaces its old cells; rows of other base settings, and cells whose key
    their settings no longer give, do not join."""
    base = base.replace(out_dir=str(tmp_path))
    run_compare(base, "small", seeds=1, methods=["Fed-LoRA"], quiet=True)
    folder = run_compare(base, "small", seeds=1, methods=["LoRA"], quiet=True)
    results = json.loads((folder / "results.json").read_text())
    assert [r["method"] for r in results["table"]] == ["LoRA", "Fed-LoRA"]
    assert [c["label"] for c in results["cells"]] == ["LoRA", "Fed-LoRA"]
    again = json.loads((run_compare(base, "small", seeds=1, methods=["Fed-LoRA"], quiet=True)
                        / "results.json").read_text())
    assert again["cells"] == results["cells"]  # the same cells (reused), not a second Fed-LoRA row

    results["cells"][1]["key"] = "0" * 16  # as if Fed-LoRA's maths had changed since
    (folder / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    run_compare(base, "small", seeds=1, methods=["LoRA"], quiet=True)
    err = " ".join(capsys.readouterr().err.split())
    assert "1 earlier row(s) left out" in err and err.rstrip().endswith("run them again to have them back): Fed-LoRA")
    methods = lambda: [r["method"] for r in json.loads((folder / "results.json").read_text())["table"]]  # noqa: E731
    assert methods() == ["LoRA"]

    run_compare(base, "small", seeds=1, methods=["Fed-LoRA"], quiet=True)
    assert methods() == ["LoRA", "Fed-LoRA"]
    assert run_compare(base.replace(lora_r=4), "small", seeds=1, methods=["LoRA"], quiet=True) == folder
    assert methods() == ["LoRA"]  # the r=2 rows do not join a grid of r=4


@pytest.mark.slow
def test_cells_run_side_by_side_give_the_same_grid(base, tmp_path):
    """`jobs=2` runs the cells (a teacher-distilling one among them, its teacher trained first) and
    the first tuning trials in two processes: the same rows, rounds and tuning as one at a time."""
    methods = ["LoRA", "Fed-LoRA-KD (server teacher)"]

    def grid(jobs: int, out: str, **kwargs) -> dict:
        folder = run_compare(base.replace(out_dir=str(tmp_path / out), engine="local"), "small", seeds=1,
                             quiet=True, jobs=jobs, **kwargs)
        return json.loads((folder / "results.json").read_text())

    def measured(results: dict) -> list:
        return [(c["label"], c["key"], c["summary"]["dev"],
                 [{k: v for k, v in r.items() if isinstance(v, (int, float)) and "seconds" not in k and k != "elapsed"}
                  for r in c["rounds"]])
                for c in results["cells"]]

    one, two = grid(1, "one", methods=methods), grid(2, "two", methods=methods)
    assert [c[:2] for c in measured(one)] == [c[:2] for c in measured(two)]
    for a, b in zip(measured(one), measured(two)):
        assert a[2] == pytest.approx(b[2], rel=1e-4, abs=1e-6), a[0]
        assert len(a[3]) == len(b[3]) and all(x == pytest.approx(y, rel=1e-4, abs=1e-6) for x, y in zip(a[3], b[3]))
    tuned = [grid(jobs, f"tune-{jobs}", methods=["Fed-LoRA"], tune=True)["tuning"] for jobs in (1, 2)]
    assert [t["chosen"] for t in tuned[0]] == [t["chosen"] for t in tuned[1]]
    assert [x["cell"] for x in tuned[0][0]["trials"]] == [x["cell"] for x in tuned[1][0]["trials"]]
    with pytest.raises(ValueError, match="--jobs 2 runs cells side by side .* add --engine local"):
        run_compare(base.replace(engine="ray"), "small", seeds=1, methods=["LoRA"], quiet=True, jobs=2)


def _store(cells_dir: Path, cell, mcc: float, auc: float = 0.5) -> None:
    result = _finished_cell(cell, mcc)
    result["summary"]["dev"].update(auc=auc, loss=1 - mcc)
    (cells_dir / f"{cell.key}.json").write_text(json.dumps(result))


def test_cached_only_tables_the_finished_rows_names_the_rest_and_trains_nothing(base, tmp_path, monkeypatch, capsys):
    from fedtune.tune import search_space, trial_settings

    base = base.replace(out_dir=str(tmp_path))
    monkeypatch.setattr(fedtune.simulation, "run_federated", must_not_run)
    monkeypatch.setattr(fedtune.centralized, "run_centralized", must_not_run)
    grid = dict(seeds=2, methods=["Fed-LoRA", "FlexLoRA"], remedy_names=["fedlc"], quiet=True)
    with pytest.raises(ValueError, match="no finished cells under"):  # no grid ran here: nothing is created
        run_compare(base, "small", cached_only_rows=True, **grid)
    assert list(tmp_path.iterdir()) == []

    cells_dir = tmp_path / "compare" / "cells"
    cells_dir.mkdir(parents=True)
    cells = make_grid(base, seeds=2, methods=grid["methods"], remedy_names=["fedlc"])
    assert [c.label for c in cells] == ["Fed-LoRA"] * 2 + ["Fed-LoRA + fedlc"] * 2 + ["FlexLoRA"] * 2 + ["FlexLoRA + fedlc"] * 2
    with pytest.raises(ValueError, match="no row of this grid is finished"):
        run_compare(base, "small", cached_only_rows=True, **grid)
    assert not (tmp_path / "compare" / "cola-iid-small-remedies").exists()

    # Fed-LoRA: both seeds; FlexLoRA: one of two; the fedlc rows: none.
    for cell in cells[:2] + cells[4:5]:
        _store(cells_dir, cell, 0.3)
    stored = sorted(p.name for p in cells_dir.iterdir())
    folder = run_compare(base, "small", cached_only_rows=True, **grid)
    table = json.loads((folder / "results.json").read_text())["table"]
    assert [(r["method"], r["seeds"]) for r in table] == [("Fed-LoRA", 2)]
    err = capsys.readouterr().err
    for row in ("Fed-LoRA + fedlc", "FlexLoRA", "FlexLoRA + fedlc"):
        assert f"left out (--cached-only): {row}: " in err
    assert f"FlexLoRA: seed {base.seed + 1} is not finished (cell {cells[5].key})" in err
    assert sorted(p.name for p in cells_dir.iterdir()) == stored  # nothing trained, nothing written

    # With --tune a row needs its trials too: Fed-LoRA's are stored (the middle rate wins), FlexLoRA's not.
    tuned = dict(seeds=1, methods=["Fed-LoRA", "FlexLoRA"], quiet=True, tune=True)
    fedlora = cells[0]
    name, rates = next(iter(search_space(fedlora.settings, False).items()))
    from fedtune.grid import Cell

    for rate in rates:
        trial = Cell(f"Fed-LoRA [tune lora-lr={rate:g}]", trial_settings(fedlora.settings, False, name, rate, 0.3), False)
        _store(cells_dir, trial, 0.5 if rate == rates[1] else 0.1)
    chosen = make_grid(base, seeds=1, methods=["Fed-LoRA"], tuned={"Fed-LoRA": {name: rates[1]}})[0]
    _store(cells_dir, chosen, 0.4)
    folder = run_compare(base, "small", cached_only_rows=True, **tuned)
    results = json.loads((folder / "results.json").read_text())
    assert [(r["method"], r["lr"]) for r in results["table"]] == [("Fed-LoRA", f"{rates[1]:g}")]
    assert [t["chosen"] for t in results["tuning"]] == [rates[1]]
    assert "left out (--cached-only): FlexLoRA: FlexLoRA [tune lora-lr=" in capsys.readouterr().err  # as written


def test_side_by_side_cells_start_with_those_that_train_every_weight_or_client_teachers():
    """Whole-model rows and client teachers took about twice a LoRA cell's minutes in the standard
    grid; `run_cells` starts the pending cells in the order of `relative_cost`, longest first."""
    from fedtune.config import Settings
    from fedtune.grid import Cell, relative_cost

    cells = [Cell("Finetune", Settings(method="finetune"), True), Cell("LoRA", Settings(method="lora"), True),
             Cell("Fed-finetune (FedAvg)", Settings(algorithm="fedavg"), False),
             Cell("Fed-LoRA", Settings(algorithm="fedlora"), False),
             Cell("Fed-LoRA-KD (server teacher)", Settings(algorithm="fedkdlora", kd_placement="server"), False),
             Cell("Fed-LoRA-KD (client teachers)", Settings(algorithm="fedkdlora", kd_placement="client"), False),
             Cell("Fed-finetune (FedAdam)", Settings(algorithm="fedadam-full"), False)]
    assert [c.label for c in sorted(cells, key=relative_cost, reverse=True)] == [
        "Finetune", "Fed-finetune (FedAvg)", "Fed-LoRA-KD (client teachers)", "Fed-finetune (FedAdam)", "LoRA",
        "Fed-LoRA", "Fed-LoRA-KD (server teacher)"]


def test_side_by_side_cells_share_the_threads_among_the_cells_that_run(monkeypatch, tmp_path):
    """`jobs` processes split this process's threads; with fewer pending cells than jobs (the last
    row of a grid, a tuned row's final cell) each gets a larger share, not an idle core."""
    import concurrent.futures

    import torch

    from fedtune import grid
    from fedtune.config import Settings

    pools = []

    class InlinePool:  # records how the pool was asked for, runs nothing
        def __init__(self, workers, context, initializer, initargs):
            pools.append((workers, initargs[0]))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, cell, *args):
            done = concurrent.futures.Future()
            done.set_result(None)
            return done

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", InlinePool)
    monkeypatch.setattr(grid, "run_cell", lambda cell, cells_dir, quiet: {"label": cell.label})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    cells = [grid.Cell(f"Fed-LoRA {lr}", Settings(algorithm="fedlora", lora_lr=lr), False) for lr in (1e-3, 3e-3, 1e-2)]
    grid.run_cells(cells, tmp_path, quiet=True, jobs=2)
    grid.run_cells(cells[:1], tmp_path, quiet=True, jobs=2)
    grid.run_cells(cells, tmp_path, quiet=True, jobs=4)
    assert pools == [(2, 2), (1, 4), (3, 1)]
