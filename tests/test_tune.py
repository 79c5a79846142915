"""Learning-rate tuning: scored on a holdout of the private train rows (never GLUE dev), every
trial recorded, the best value applied to the grid's cells, trials cached."""

import json
from collections import Counter
from pathlib import Path

import pytest

import fedtune.centralized
import fedtune.simulation
import fedtune.tune
from fedtune.compare import preset_settings, run_compare
from fedtune.config import Settings
from fedtune.data import load_glue, prepare_task_data
from fedtune.grid import Cell, make_grid
from fedtune.tune import LR_GRID, lr_setting, trial_settings, tune_row


def test_holdout_comes_from_the_private_rows_and_replaces_dev(glue_dir):
    settings = Settings(task="cola", glue_dir=str(glue_dir), holdout_fraction=0.1)
    plain, held = prepare_task_data(settings.replace(holdout_fraction=0.0)), prepare_task_data(settings)
    dev = load_glue("cola", str(glue_dir))["validation"]
    # 6,841 private rows (8,551 minus the 1,710-row public slice): 684 held out, 6,157 still trained on.
    assert (len(plain.private), len(held.validation), len(held.private)) == (6841, 684, 6157)
    def rows(d):
        return Counter(zip(d["sentence"], d["label"]))

    # The held-out rows and the rows still trained on split the private rows (CoLA repeats some sentences).
    assert rows(held.validation) + rows(held.private) == rows(plain.private)
    assert list(held.public["sentence"]) == list(plain.public["sentence"])  # the public slice is untouched
    assert list(held.validation["sentence"]) != list(dev["sentence"])[:684]
    assert list(plain.validation["sentence"]) == list(dev["sentence"])  # without a holdout: GLUE dev


def test_each_row_tunes_the_learning_rate_it_trains_with():
    cells = {c.label: c for c in make_grid(preset_settings("standard"), seeds=1)}
    fields = {label: lr_setting(c.settings, c.centralized) for label, c in cells.items()}
    assert fields["Finetune"] == fields["Fed-finetune (FedAvg)"] == "full_lr"
    assert {fields[m] for m in ("KD", "LoRA", "Fed-LoRA", "FlexLoRA", "HetLoRA",
                                "Fed-LoRA-KD (server teacher)")} == {"lora_lr"}
    # A trial: 3 of the 10 rounds (and 30% of the centralized epochs), scored on the holdout.
    lora = trial_settings(cells["LoRA"].settings, True, "lora_lr", 1e-2)
    fed = trial_settings(cells["Fed-LoRA"].settings, False, "lora_lr", 1e-2)
    assert (lora.lora_lr, lora.epochs, fed.rounds, fed.epochs) == (1e-2, pytest.approx(0.18), 3, 0.6)
    assert lora.holdout_fraction == fed.holdout_fraction == 0.02


def test_clients_trained_with_plain_sgd_try_larger_learning_rates():
    from fedtune.tune import SGD_LR_GRID, search_space

    cells = {c.label: c for c in make_grid(preset_settings("standard"), seeds=1)}
    sgd = lambda label: cells[label].settings.replace(client_optimizer="sgd")  # noqa: E731
    assert search_space(cells["Fed-LoRA"].settings, False) == {"lora_lr": LR_GRID["lora_lr"]}
    assert search_space(sgd("Fed-LoRA"), False) == {"lora_lr": (3e-2, 1e-1, 3e-1)} == {"lora_lr": SGD_LR_GRID["lora_lr"]}
    assert search_space(sgd("Fed-finetune (FedAvg)"), False) == {"full_lr": (1e-3, 3e-3, 1e-2)}
    assert search_space(sgd("LoRA"), True) == {"lora_lr": LR_GRID["lora_lr"]}  # centralized rows train with AdamW


def _stored_trial(cell: Cell, accuracy: float, loss: float, auc: float | None = None) -> dict:
    """A cached trial as `run_cell` stores it, with made-up scores (nothing is trained)."""
    dev = {"accuracy": accuracy, "loss": loss, **({} if auc is None else {"auc": auc})}
    summary = {"dev": dev, "rounds": cell.settings.rounds,
               "total_bytes_up": 0, "total_bytes_down": 0}
    return {"label": cell.label, "seed": cell.settings.seed, "key": cell.key, "run": "-", "wall_seconds": 1.0,
            "settings": cell.settings.to_dict(), "summary": summary, "rounds": []}


def _tune_on_stored_trials(folder, monkeypatch, scores: dict[float, tuple]) -> dict:
    """`tune_row` for Fed-LoRA where every trial is already cached with the given (accuracy, loss[, auc])."""
    monkeypatch.setattr(fedtune.simulation, "run_federated", lambda *a, **k: pytest.fail("trial recomputed"))
    row = make_grid(preset_settings("standard"), seeds=1, methods=["Fed-LoRA"])[0]
    for value, stored in scores.items():
        trial = Cell("x", trial_settings(row.settings, False, "lora_lr", value), False)
        (folder / f"{trial.key}.json").write_text(json.dumps(_stored_trial(trial, *stored)))
    [record] = tune_row("Fed-LoRA", row.settings, False, folder, quiet=True)  # Fed-LoRA tunes its lr only
    return record


def test_best_holdout_score_wins_and_ties_go_to_the_higher_auc(tmp_path, monkeypatch):
    # 1e-3 and 3e-3 tie on accuracy; 3e-3 ranks the holdout better (AUC) though its loss is higher
    scores = {1e-3: (0.85, 0.40, 0.90), 3e-3: (0.85, 0.45, 0.92), 1e-2: (0.80, 0.50, 0.95)}
    record = _tune_on_stored_trials(tmp_path, monkeypatch, scores)
    assert record["chosen"] == 3e-3 and record["setting"] == "lora-lr"
    assert [(t["value"], t["accuracy"], t["loss"], t["auc"]) for t in record["trials"]] == [
        (v, *stored) for v, stored in scores.items()]
    assert "not GLUE dev" in record["scored_on"]


def test_the_best_metric_wins_whatever_the_auc(tmp_path, monkeypatch):
    scores = {1e-3: (0.80, 0.50, 0.99), 3e-3: (0.85, 0.40, 0.90), 1e-2: (0.84, 0.45, 0.92)}
    assert _tune_on_stored_trials(tmp_path, monkeypatch, scores)["chosen"] == 3e-3


def test_a_tied_trial_stored_without_auc_runs_again(tmp_path, monkeypatch):
    # 3e-3 and 1e-2 tie and were stored before AUC was recorded: both run again (here: a stub run
    # that stores AUC 0.7 for 3e-3 and 0.8 for 1e-2); 1e-3, not tied, is reused as stored. 1e-2 is
    # at the grid's edge, so 3e-2 runs too (stored here with a lower accuracy).
    scores = {1e-3: (0.80, 0.50), 3e-3: (0.85, 0.40), 1e-2: (0.85, 0.45), 3e-2: (0.5, 0.7, 0.5)}
    rerun = []

    def fake_run_cell(cell, cells_dir, quiet):
        path = cells_dir / f"{cell.key}.json"
        if not path.is_file():
            rerun.append(cell.settings.lora_lr)
            stored = _stored_trial(cell, 0.85, 0.4, {3e-3: 0.7, 1e-2: 0.8}[cell.settings.lora_lr])
            path.write_text(json.dumps(stored))
        return json.loads(path.read_text())

    monkeypatch.setattr(fedtune.tune, "run_cell", fake_run_cell)
    record = _tune_on_stored_trials(tmp_path, monkeypatch, scores)
    assert sorted(rerun) == [3e-3, 1e-2] and record["chosen"] == 1e-2
    assert [t["auc"] for t in record["trials"]] == [None, 0.7, 0.8, 0.5]


@pytest.mark.parametrize("extra, accuracy, chosen", [(3e-2, 0.88, 3e-2), (3e-2, 0.50, 1e-2)])
def test_a_best_value_at_the_grid_edge_gets_one_more_step(tmp_path, monkeypatch, extra, accuracy, chosen):
    # 1e-2 is best of the grid, so 1e-2 * (1e-2 / 3e-3) = 3e-2 is tried too; it wins only if better.
    scores = {1e-3: (0.80, 0.5, 0.9), 3e-3: (0.85, 0.4, 0.9), 1e-2: (0.86, 0.4, 0.9), extra: (accuracy, 0.4, 0.9)}
    record = _tune_on_stored_trials(tmp_path, monkeypatch, scores)
    assert [t["value"] for t in record["trials"]] == pytest.approx([1e-3, 3e-3, 1e-2, 3e-2])
    assert record["chosen"] == pytest.approx(chosen)


@pytest.mark.slow
def test_tuned_grid_runs_each_method_at_its_chosen_rate(tiny_bert, glue_dir, tmp_path, monkeypatch):
    given = {"task": "sst2", "glue-dir": str(glue_dir), "model": tiny_bert, "clients": 2, "rounds": 2,
             "train-limit": 400, "eval-limit": 32, "batch-size": 8, "max-length": 32, "local-steps": 2,
             "lora-r": 2, "out-dir": str(tmp_path)}
    base = preset_settings("small", given)
    folder = run_compare(base, "small", seeds=1, methods=["LoRA", "Fed-LoRA"], quiet=True, tune=True)
    results = json.loads((folder / "results.json").read_text())
    tuning = {t["method"]: t for t in results["tuning"]}
    assert set(tuning) == {"LoRA", "Fed-LoRA"}
    for label, record in tuning.items():
        values = [t["value"] for t in record["trials"]]
        assert set(LR_GRID["lora_lr"]) <= set(values) and len(values) <= len(LR_GRID["lora_lr"]) + 1
        best = max(record["trials"], key=lambda t: (t["accuracy"], t["auc"]))
        assert record["chosen"] == best["value"]
        cells = [c for c in results["cells"] if c["label"] == label]
        assert {c["settings"]["lora-lr"] for c in cells} == {record["chosen"]}
        assert {c["settings"]["holdout-fraction"] for c in cells} == {0.0}  # the grid itself reports GLUE dev
        row = next(r for r in results["table"] if r["method"] == label)
        assert row["lr"] == f"{record['chosen']:g}"
    trial = json.loads((Path(tmp_path) / "compare" / "cells" / f"{tuning['Fed-LoRA']['trials'][0]['cell']}.json")
                       .read_text())
    assert trial["settings"]["holdout-fraction"] == 0.02 and trial["settings"]["rounds"] == 1
    # Tuning again reuses every trial and every cell.
    monkeypatch.setattr(fedtune.simulation, "run_federated", lambda *a, **k: pytest.fail("recomputed"))
    monkeypatch.setattr(fedtune.centralized, "run_centralized", lambda *a, **k: pytest.fail("recomputed"))
    again = run_compare(base, "small", seeds=1, methods=["LoRA", "Fed-LoRA"], quiet=True, tune=True)
    assert json.loads((again / "results.json").read_text())["tuning"] == results["tuning"]


def test_a_tie_without_auc_after_a_rerun_goes_to_the_lower_loss(tmp_path, monkeypatch):
    # A run that records no AUC (a task with more than two labels): the re-run happens once, not forever.
    scores = {1e-3: (0.85, 0.40), 3e-3: (0.85, 0.35), 1e-2: (0.80, 0.45)}
    runs = []

    def fake_run_cell(cell, cells_dir, quiet):
        path = cells_dir / f"{cell.key}.json"
        if not path.is_file():
            runs.append(cell.settings.lora_lr)
            path.write_text(json.dumps(_stored_trial(cell, *scores[cell.settings.lora_lr])))
        return json.loads(path.read_text())

    monkeypatch.setattr(fedtune.tune, "run_cell", fake_run_cell)
    record = _tune_on_stored_trials(tmp_path, monkeypatch, scores)
    assert sorted(runs) == [1e-3, 3e-3] and record["chosen"] == 3e-3


def test_tune_share_sets_the_trial_length():
    cells = {c.label: c for c in make_grid(preset_settings("standard", {"task": "cola"}), seeds=1)}
    lora, fed = cells["LoRA"].settings, cells["Fed-LoRA"].settings
    # share 1: the whole budget (10 rounds; the centralized row's 10 x 0.5 epochs), still on the holdout
    whole = trial_settings(lora, True, "lora_lr", 1e-3, share=1.0)
    assert (whole.epochs, whole.rounds, whole.holdout_fraction) == (lora.epochs, 10, 0.1) == (5.0, 10, 0.1)
    assert trial_settings(fed, False, "lora_lr", 1e-3, share=0.5).rounds == 5
    assert trial_settings(fed, False, "lora_lr", 1e-3, share=0.01).rounds == 1  # never no rounds


@pytest.mark.parametrize("argv, says", [
    (["--tune-share", "1"], "give it with --tune"),
    (["--tune", "--tune-share", "0"], "tune-share=0"),
    (["--tune", "--tune-share", "1.5"], "tune-share=1.5"),
])
def test_a_bad_tune_share_is_one_clear_error_before_anything_runs(argv, says, tmp_path, capsys, monkeypatch):
    from fedtune.cli import main

    monkeypatch.setattr(fedtune.tune, "run_cell", lambda *a, **k: pytest.fail("a trial ran"))
    assert main(["compare", "--task", "cola", "--out-dir", str(tmp_path / "out"), *argv]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_search_starts_at_the_middle_of_each_later_grid(monkeypatch, tmp_path):
    # fedadam-full's server-lr default (1e-2, shared with LoRA's fedadam) diverges on the whole model:
    # its learning-rate trials run at the middle of its server-lr grid (1e-4) instead, and the
    # server-lr trials then at the chosen learning rate.
    from fedtune.tune import first_trials, search_start

    base = preset_settings("standard").replace(client_optimizer="sgd")
    [row] = make_grid(base, seeds=1, methods=["Fed-finetune (FedAdam)"])
    assert row.settings.server_lr == 1e-2
    assert search_start(row.settings, False).server_lr == 1e-4
    first = first_trials(base, ["Fed-finetune (FedAdam)"])
    assert [(c.settings.full_lr, c.settings.server_lr) for c in first] == [(1e-3, 1e-4), (3e-3, 1e-4), (1e-2, 1e-4)]

    seen = []

    def fake_run_cell(cell, cells_dir, quiet):
        s = cell.settings
        seen.append((s.full_lr, s.server_lr))
        accuracy = 0.9 if s.full_lr == 3e-3 else 0.5  # 3e-3 wins the first stage, then ties break by AUC
        auc = {3e-5: 0.7, 1e-4: 0.8, 3e-4: 0.6}.get(s.server_lr, 0.5)
        return {"key": cell.key, "summary": {"dev": {"accuracy": accuracy, "loss": 0.5, "auc": auc}}}

    monkeypatch.setattr(fedtune.tune, "run_cell", fake_run_cell)
    records = tune_row(row.label, row.settings, False, tmp_path, quiet=True)
    assert [(r["setting"], r["chosen"]) for r in records] == [("full-lr", 3e-3), ("server-lr", 1e-4)]
    assert seen == [(1e-3, 1e-4), (3e-3, 1e-4), (1e-2, 1e-4), (3e-3, 3e-5), (3e-3, 1e-4), (3e-3, 3e-4)]


@pytest.mark.parametrize("algorithm", ["fedprox", "fedadam", "feddyn"])
def test_where_the_default_is_the_middle_of_the_grid_the_start_changes_nothing(algorithm):
    # So the trials these rows stored before `search_start` keep their cache keys.
    from fedtune.tune import search_start

    settings = Settings(algorithm=algorithm)
    assert Cell("x", search_start(settings, False), False).key == Cell("x", settings, False).key
