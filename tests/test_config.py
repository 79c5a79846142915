import pytest

from fedtune.cli import build_parser, settings_from_args
from fedtune.config import Settings


def test_defaults_round_trip_through_kebab_keys():
    settings = Settings()
    assert Settings.from_dict(settings.to_dict()) == settings
    assert "lora-r" in settings.to_dict()


def test_values_are_coerced_to_field_types():
    settings = Settings.from_dict({"lora-r": "16", "lora-lr": "3e-4", "rounds": 7.0})
    assert (settings.lora_r, settings.lora_lr, settings.rounds) == (16, 3e-4, 7)


def test_unknown_key_is_rejected_with_the_known_keys():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) lora-rank.*known:.*lora-r"):
        Settings.from_dict({"lora-rank": 8})


def test_bad_choice_names_the_options():
    with pytest.raises(ValueError, match=r"task='cola2' \(choose from: cola, sst2\)"):
        Settings(task="cola2")


@pytest.mark.parametrize("changes, message", [
    ({"rounds": 0}, "rounds=0"),
    ({"fraction-train": 1.5}, "fraction-train"),
    ({"public-fraction": 1.0}, "public-fraction"),
    ({"lora-r": 2.5}, "whole number"),
    ({"clients": "many"}, "must be an int"),
    ({"secure-aggregation": "secagg+", "codec": "int8"}, "secure-aggregation needs codec=none"),
    ({"secure-aggregation": "secagg+", "dp-noise": 1.0}, "secure-aggregation needs .*dp-noise=0"),
    ({"batching": "sorted"}, r"batching='sorted' \(choose from: random, by-length\)"),
    ({"lora-lr": -0.5}, r"lora-lr=-0.5 \(must be > 0\)"),
    ({"lora-lr": "nan"}, r"lora-lr=nan \(must be a finite number\)"),
    ({"full-lr": "inf"}, r"full-lr=inf \(must be a finite number\)"),
    ({"full-lr": 0}, r"full-lr=0.0 \(must be > 0\)"),
    ({"weight-decay": -1}, r"weight-decay=-1.0 \(must be >= 0\)"),
    ({"lora-dropout": 1.0}, r"lora-dropout=1.0 \(must be in \[0, 1\)\)"),
    ({"lora-r": 100000}, r"lora-r=100000 \(must be <= 1024"),
    ({"max-failed-rounds": -1}, r"max-failed-rounds=-1 \(must be >= 0\)"),
])
def test_invalid_values_raise_one_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_dict(changes)


def test_toml_file_then_flags_win(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[fedtune]\ntask = "cola"\nlora-r = 4\nrounds = 9\n')
    args = build_parser().parse_args(["run", "--config", str(path), "--rounds", "2"])
    settings = settings_from_args(args)
    assert (settings.task, settings.lora_r, settings.rounds) == ("cola", 4, 2)


def test_flower_run_config_uses_the_same_keys():
    settings = Settings.from_run_config({"task": "cola", "algorithm": "fedavg", "clients": 3})
    assert (settings.task, settings.algorithm, settings.clients) == ("cola", "fedavg", 3)


def test_pyproject_run_config_lists_every_setting():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    run_config = pyproject["tool"]["flwr"]["app"]["config"]
    # `flwr run --run-config` can only override keys listed there, so all must be.
    assert set(run_config) == set(Settings().to_dict())
    Settings.from_run_config(run_config)  # and they validate


def test_the_flower_app_bundle_holds_the_package_and_fits_flowers_limit():
    """`flwr run .` ships the app as a FAB of at most 10 MB (Flower refuses a larger one): the
    package's code and plug-in list, not the committed results under docs/."""
    import io
    import zipfile
    from pathlib import Path

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    fab = build_fab_from_disk(Path(__file__).parents[1])
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "fedtune/server_app.py" in names and "fedtune/client_app.py" in names and "fedtune/plugins.json" in names
    assert not [n for n in names if n.split("/")[0] in ("docs", "tests", "benchmarks", "scripts")]
    assert len(fab) < FAB_MAX_SIZE / 10


def test_help_lists_the_algorithms_and_only_the_options_a_command_reads(capsys):
    from fedtune.algorithms import registered
    from fedtune.config import ALGORITHMS

    assert ALGORITHMS == tuple(registered())  # the help's list (from plugins.json) is the registry's
    for command, present, absent in (("run", ["--algorithm", "--rounds", "--lora-lr"], ["--method", "--epochs"]),
                                     ("centralized", ["--method", "--epochs"], ["--rounds", "--algorithm"])):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert all(option in text for option in present) and not any(f"{o} " in text for o in absent), command
        if command == "run":
            assert all(name in " ".join(text.split()) for name in ALGORITHMS)


def test_flowers_expected_warnings_are_dropped_and_others_kept():
    import logging

    from fedtune.console import quiet_libraries

    quiet_libraries()
    flwr = logging.getLogger("flwr")
    record = lambda text: logging.LogRecord("flwr", logging.WARNING, __file__, 1, text, None, None)  # noqa: E731
    assert not flwr.filter(record("DEPRECATED FEATURE: The `run_simulation` function is deprecated"))
    assert flwr.filter(record("round 2: dropped reply from node 7: client error"))


def test_probed_faults_end_in_one_clear_message(tmp_path, capsys, glue_dir):
    from fedtune.cli import main

    bad = tmp_path / "run.toml"
    bad.write_text("rounds = = 3\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert f"settings file {bad} is not valid TOML" in capsys.readouterr().err
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    assert main(["centralized", "--model", str(empty), "--task", "cola", "--glue-dir", str(glue_dir)]) == 2
    assert f"model folder {empty} holds no Hugging Face model" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"krum needs at least 2 \* krum-malicious \+ 3 = 5 sampled clients.*samples 2"):
        Settings(aggregation="krum", krum_malicious=1, clients=2)
    Settings(aggregation="krum", krum_malicious=1, clients=5)  # n = 2f + 3 is enough


def test_report_names_and_skips_a_corrupt_summary(tmp_path, capsys):
    import json

    from fedtune.cli import main

    good = tmp_path / "centralized-lora-cola-1"
    good.mkdir()
    (good / "summary.json").write_text(json.dumps({"method": "lora", "task": "cola", "dev": {"accuracy": 0.7},
                                                   "train_samples": 10, "seconds": 3.0}))
    broken = tmp_path / "fedlora-cola-2"
    broken.mkdir()
    (broken / "summary.json").write_text('{"algorithm": "fedlora", ')
    assert main(["report", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "centralized-lora-cola-1" in out and "fedlora-cola-2" not in out
    assert f"skipped unreadable {broken / 'summary.json'}: JSONDecodeError" in err


def test_report_skips_summaries_with_nulls_or_strings_and_marks_failed_rounds(tmp_path, capsys):
    import json

    from fedtune.cli import main

    federated = {"algorithm": "fedlora", "task": "sst2", "dev": {"accuracy": 0.8}, "clients": 2, "rounds": 3,
                 "total_bytes_up": 1e6, "total_bytes_down": 2e6, "examples_seen": 90, "seconds": 5.0, "lora_r": 8}
    bad = {"nulls": {**federated, "dev": {"accuracy": None}}, "strings": {**federated, "seconds": "5"},
           "a list": [federated], "no dev": {**federated, "dev": 0.8}}
    for name, summary in {**bad, "good": federated, "failed": {**federated, "failed_rounds": 2}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "| good | fedlora r=8 (2 clients, 3 rounds) |" in out
    assert "| failed | fedlora r=8 (2 clients, 3 rounds, 2 rounds failed) |" in out
    assert all(f"skipped unreadable {tmp_path / name / 'summary.json'}" in err for name in bad)
    assert "dev.accuracy is None, not a number" in err and "seconds is '5', not a number" in err


def test_a_model_that_gets_one_class_never_right_is_marked_as_having_learned_nothing(tmp_path, capsys):
    import json

    import numpy as np

    from fedtune.cli import main
    from fedtune.metrics import classification_metrics, learned_nothing

    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    majority = classification_metrics("sst2", labels, np.ones(7, dtype=int))  # "positive" for every row
    assert majority["accuracy"] == 4 / 7 and majority["balanced_accuracy"] == 0.5 and majority["worst_class_recall"] == 0
    assert "worst-class recall 0" in learned_nothing(majority)
    assert learned_nothing(classification_metrics("sst2", labels, np.array([0, 1, 1, 1, 1, 1, 1]))) is None
    assert learned_nothing({"accuracy": 0.509}) is None  # recorded before the recall was: not judged
    summary = {"algorithm": "fedlora", "task": "sst2", "dev": majority, "clients": 2, "rounds": 3,
               "total_bytes_up": 1e6, "total_bytes_down": 2e6, "examples_seen": 90, "seconds": 5.0, "lora_r": 8}
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(tmp_path)]) == 0
    assert "acc 0.5714 (one class: learned nothing)" in capsys.readouterr().out
