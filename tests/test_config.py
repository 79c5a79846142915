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
