"""The comparison grid on a tiny model: table, plots and JSON; finished cells are reused."""

import json

import pytest

import fedtune.centralized
import fedtune.simulation
from fedtune.compare import make_grid, preset_settings, run_compare


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


def test_grid_gives_centralized_methods_the_federated_budget(base):
    cells = make_grid(base.replace(local_epochs=0.5, rounds=4), seeds=2)
    assert len(cells) == 9 * 2
    lora = [c for c in cells if c.label == "LoRA"]
    assert [c.settings.seed for c in lora] == [base.seed, base.seed + 1] and lora[0].settings.epochs == 2.0
    # Centralized cells ignore federated settings, so IID and Dirichlet grids share them.
    dirichlet = make_grid(base.replace(local_epochs=0.5, rounds=4, partition="dirichlet"), seeds=2)
    assert [c.key for c in cells if c.centralized] == [c.key for c in dirichlet if c.centralized]
    assert [c.key for c in cells if not c.centralized] != [c.key for c in dirichlet if not c.centralized]


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

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

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
