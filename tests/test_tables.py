"""The README's result tables are generated from the committed grid files, never typed by hand."""

import json

import pytest

from fedtune.tables import DOCUMENTS, blocks, headline, load_grids, render, tuning_rows


def test_committed_documents_match_the_committed_grid_files():
    generated = blocks()
    for path in DOCUMENTS:
        text = path.read_text()
        assert "<!-- results:" in text, path
        assert render(text, generated) == text, f"{path.name} is stale: run `python -m fedtune.tables`"


def _grid(task: str, rows: list[dict], seeds: int = 2) -> dict:
    return {"task": task, "partition": "iid", "preset": "standard", "seeds": seeds, "table": rows, "tuning": []}


def _row(method: str, mb: str = "-", **metrics) -> dict:
    return {"method": method, **metrics, "MB up / round": mb, "MB down / round": mb}


def test_headline_puts_each_task_and_partition_in_its_own_columns(tmp_path):
    grids = {"sst2-iid": _grid("sst2", [_row("Fed-LoRA", "1.249", accuracy="0.8812 ± 0.0021"),
                                        _row("LoRA", accuracy="0.8900 ± 0.0000")]),
             "cola-dirichlet": _grid("cola", [_row("Fed-LoRA", "1.249", MCC="0.2000 ± 0.0100",
                                                   accuracy="0.7000 ± 0.0000")], seeds=1)}
    for name, grid in grids.items():
        (tmp_path / f"{name}-standard.json").write_text(json.dumps(grid))
    lines = headline(load_grids("standard", tmp_path)).splitlines()
    assert lines[0] == ("| method | SST-2 IID acc (2 seeds) | CoLA Dir 0.1 MCC (1 seed) | CoLA Dir 0.1 acc (1 seed) "
                        "| seed system acc (SST-2 / CoLA) | MB up / round | MB down / round |")
    # Grid order (centralized LoRA first), 3 decimals, "-" where a grid lacks the method.
    assert lines[2:] == ["| LoRA | 0.890 | - | - | - | - | - |",
                         "| Fed-LoRA | 0.881 | 0.200 | 0.700 | 0.881 / 0.756 | 1.249 | 1.249 |"]
    assert headline({}) == "_No grid of this preset has finished yet._"


def test_tuning_rows_list_every_trial_and_mark_the_choice():
    record = {"method": "LoRA", "setting": "lora-lr", "chosen": 3e-3, "metric": "accuracy",
              "trials": [{"value": 1e-3, "accuracy": 0.8}, {"value": 3e-3, "accuracy": 0.85},
                         {"value": 1e-2, "accuracy": 0.5}]}
    assert tuning_rows([record]) == [{"method": "LoRA", "setting": "lora-lr",
                                      "holdout accuracy per value": "0.001: 0.8000, **0.003: 0.8500**, 0.01: 0.5000"}]


def test_tied_trials_show_their_auc():
    record = {"method": "LoRA", "setting": "lora-lr", "chosen": 3e-3, "metric": "mcc",
              "trials": [{"value": 1e-3, "mcc": 0.0, "auc": 0.61}, {"value": 3e-3, "mcc": 0.0, "auc": 0.66},
                         {"value": 1e-2, "mcc": -0.01, "auc": 0.7}]}
    assert tuning_rows([record])[0]["holdout mcc per value"] == (
        "0.001: 0.0000 (AUC 0.6100), **0.003: 0.0000 (AUC 0.6600)**, 0.01: -0.0100")


def test_unknown_block_is_refused():
    with pytest.raises(ValueError, match="unknown results block 'nope'"):
        render("<!-- results:nope:begin -->\n<!-- results:nope:end -->", {"a": "b"})


def test_model_dropout_table_sets_the_two_settings_side_by_side(tmp_path):
    from fedtune.tables import MODEL_DROPOUT, model_dropout_table

    assert model_dropout_table(tmp_path) == "_Not measured yet._"
    for (name, file), accuracies in zip(MODEL_DROPOUT.items(), (("0.8630 ± 0.0063", "0.8500 ± 0.0010"),
                                                                ("0.8646 ± 0.0046", "0.8503 ± 0.0029"))):
        rows = [_row(m, accuracy=a, seeds=2) for m, a in zip(("LoRA", "Fed-LoRA"), accuracies)]
        (tmp_path / file).write_text(json.dumps(_grid("sst2", rows)))
    lines = model_dropout_table(tmp_path).splitlines()
    assert "dev accuracy, model's own dropout (0.1)" in lines[0] and "dev accuracy, model-dropout 0" in lines[0]
    assert [cell.strip() for cell in lines[3].strip("|").split("|")] == ["Fed-LoRA", "2", "0.8500 ± 0.0010",
                                                                         "0.8503 ± 0.0029"]


def test_rows_whose_server_uses_its_own_data_are_marked(tmp_path):
    from fedtune.config import Settings

    grid = _grid("sst2", [_row("Fed-LoRA", "1.249", accuracy="0.5092 ± 0.0000"),
                          _row("Fed-LoRA-KD (server teacher)", "0.634", accuracy="0.8131 ± 0.0000")], seeds=1)
    federated = {"rounds": 10, "dev": {"accuracy": 0.5}}
    grid["cells"] = [{"label": "Fed-LoRA", "settings": Settings(algorithm="fedlora").to_dict(), "summary": federated},
                     {"label": "Fed-LoRA-KD (server teacher)", "summary": federated,
                      "settings": Settings(algorithm="fedkdlora", kd_placement="server").to_dict()}]
    (tmp_path / "sst2-iid-standard.json").write_text(json.dumps(grid))
    text = headline(load_grids("standard", tmp_path))
    assert "| Fed-LoRA-KD (server teacher) † | 0.813 |" in text and "| Fed-LoRA | 0.509 |" in text
    assert text.endswith("† the server also trains on labelled data it holds (the public slice)")


def test_skew_curve_puts_each_federated_row_and_its_remedies_under_each_skew(tmp_path):
    from fedtune.tables import skew_curve, skew_plot

    stat = lambda v: {"mean": v, "std": 0.0, "values": [v]}  # noqa: E731
    files = {"sst2-iid-standard.json": _grid("sst2", [_row("LoRA", accuracy=stat(0.9)),
                                                        _row("Fed-LoRA", "1.249", accuracy=stat(0.845))]),
             "sst2-dirichlet0.5-standard.json": _grid("sst2", [_row("Fed-LoRA", "1.249", accuracy=stat(0.811),
                                                                    **{"balanced acc": stat(0.809)})], seeds=1),
             "sst2-dirichlet-standard-remedies.json": _grid("sst2", [
                 _row("Fed-LoRA + scaffold", "2.496", accuracy=stat(0.509), **{"balanced acc": stat(0.5)}),
                 _row("Fed-LoRA + ccvr-lda", "1.723", accuracy=stat(0.773), seeds=1)], seeds=1),
             # a remedy run without skew (one seed, under a two-seed column) says its seeds
             "sst2-iid-standard-remedies.json": _grid("sst2", [
                 _row("Fed-LoRA + ccvr-lda", "1.723", accuracy=stat(0.84), **{"balanced acc": stat(0.839)})], seeds=1),
             # the same row run again with two seeds replaces the one-seed cell and says so
             "sst2-dirichlet-standard-seeds.json": _grid("sst2", [
                 _row("Fed-LoRA + ccvr-lda", "1.723", accuracy={"mean": 0.775, "std": 0.002, "values": [0.773, 0.777]},
                      seeds=2)], seeds=2)}
    assert skew_curve(tmp_path) == "_No skewed grid has finished yet._"
    for name, grid in files.items():
        (tmp_path / name).write_text(json.dumps(grid))
    lines = skew_curve(tmp_path).splitlines()
    # The plot draws the rows measured under two neighbouring skews, a gap where one was not measured.
    assert skew_plot(tmp_path) == {"Fed-LoRA": [0.845, 0.811, None]}
    assert (tmp_path / "skew-curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lines[0] == "| method | IID (2 seeds) | Dir 0.5 (1 seed) | Dir 0.1 (1 seed) |"
    # Centralized rows have no skew; a remedied row follows its method's row.
    assert lines[2:5] == ["| Fed-LoRA | 0.845 | 0.811 (0.809) | - |", "| Fed-LoRA + ccvr-lda | 0.840 (0.839), 1 seed | - | 0.775, 2 seeds |",
                          "| Fed-LoRA + scaffold | - | - | 0.509 (0.500) |"]


def test_skew_summary_gives_each_method_its_best_remedy_without_new_server_data(tmp_path):
    from fedtune.config import Settings
    from fedtune.tables import skew_summary

    stat = lambda v: {"mean": v, "std": 0.0, "values": [v]}  # noqa: E731
    server = {"label": "Fed-LoRA + server-finetune", "summary": {"rounds": 10},
              "settings": Settings(algorithm="fedlora", server_finetune_steps=26).to_dict()}
    remedies = _grid("sst2", [_row("Fed-LoRA + fedlc", "1.249", accuracy=stat(0.491)),
                              _row("Fed-LoRA + ccvr-lda", "1.723", accuracy=stat(0.773), **{"balanced acc": stat(0.774)}),
                              _row("Fed-LoRA + server-finetune", "1.249", accuracy=stat(0.846)),
                              _row("FlexLoRA + fedlc", "1.1", accuracy=stat(0.491))], seeds=1)
    remedies["cells"] = [server]
    files = {"sst2-iid-standard.json": _grid("sst2", [_row("Fed-LoRA", "1.249", accuracy=stat(0.845)),
                                                        _row("FlexLoRA", "1.1", accuracy=stat(0.85))]),
             "sst2-dirichlet-standard.json": _grid("sst2", [_row("Fed-LoRA", "1.249", accuracy=stat(0.509)),
                                                            _row("FlexLoRA", "1.1", accuracy=stat(0.509))], seeds=1),
             "sst2-dirichlet-standard-remedies.json": remedies}
    for name, grid in files.items():
        (tmp_path / name).write_text(json.dumps(grid))
    lines = skew_summary(tmp_path).splitlines()
    assert lines[0] == "| method | IID (2 seeds) | Dir 0.5 | best remedy, Dir 0.5 | Dir 0.1 (1 seed) | best remedy, Dir 0.1 |"
    # server-finetune is the most accurate remedied row, but it gives the server labelled data: not counted
    assert lines[2] == "| Fed-LoRA | 0.845 | - | - | 0.509 | ccvr-lda: 0.773 (0.774) |"
    # a best remedy that is still below the row without one says so
    assert lines[3] == "| FlexLoRA | 0.850 | - | - | 0.509 | fedlc: 0.491 ↓ |"
    assert len(lines) == 6 and "Best remedy" in lines[-1] and "↓ even it is below" in lines[-1]


def test_skew_summary_ranks_remedies_measured_on_more_seeds_above_one_lucky_seed(tmp_path):
    from fedtune.tables import skew_summary

    stat = lambda *v: {"mean": sum(v) / len(v), "std": 0.0, "values": list(v)}  # noqa: E731
    files = {"sst2-dirichlet-standard.json": _grid("sst2", [_row("Fed-LoRA", "1.249", accuracy=stat(0.509)),
                                                            _row("FlexLoRA", "1.1", accuracy=stat(0.509))], seeds=1),
             "sst2-dirichlet-standard-remedies.json": _grid("sst2", [
                 _row("Fed-LoRA + swa+ccvr-lda", "1.7", accuracy=stat(0.790)),   # one seed, the highest run
                 _row("Fed-LoRA + fedlc", "1.249", accuracy=stat(0.491)),
                 _row("FlexLoRA + fedlc", "1.1", accuracy=stat(0.600)),           # one seed only: still named
                 _row("FlexLoRA + ccvr-lda", "1.7", accuracy=stat(0.500))], seeds=1),
             "sst2-dirichlet-standard-seeds.json": _grid("sst2", [
                 _row("Fed-LoRA + ccvr-lda", "1.7", accuracy=stat(0.780, 0.770), seeds=2),
                 _row("Fed-LoRA + feddecorr+ccvr-lda", "1.7", accuracy=stat(0.760, 0.750), seeds=2)], seeds=2)}
    for name, grid in files.items():
        (tmp_path / name).write_text(json.dumps(grid))
    lines = skew_summary(tmp_path).splitlines()
    # ccvr-lda's two seeds (.775) outrank feddecorr's (.755) and swa's single .790, which is named after it
    assert lines[2] == ("| Fed-LoRA | - | - | - | 0.509 | ccvr-lda: 0.775, 2 seeds; on 1 seed: swa+ccvr-lda 0.790 |")
    # with one-seed rows only, the most accurate of them
    assert lines[3] == "| FlexLoRA | - | - | - | 0.509 | fedlc: 0.600 |"
