"""Server-side SWA (`swa-rounds`): the final model is the mean of the last rounds' global states."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune.config import Settings
from fedtune.simulation import run_federated
from fedtune.swa import first_round, running_mean
from tests.conftest import comparable_rounds


def test_the_running_mean_is_the_mean_of_the_states():
    generator = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(3, 2, generator=generator), "b": torch.randn(4, generator=generator)} for _ in range(4)]
    mean = {}
    for count, state in enumerate(states, start=1):
        mean = running_mean(mean, state, count)
    for name in ("a", "b"):
        torch.testing.assert_close(mean[name], torch.stack([s[name] for s in states]).mean(0))
    first = running_mean({}, states[0], 1)
    first["a"][0, 0] = 99.0  # a copy: the round's own state is not changed through the mean
    assert states[0]["a"][0, 0] != 99.0


def test_the_mean_starts_swa_rounds_before_the_end():
    assert first_round(10, 3) == 8  # rounds 8, 9, 10
    assert first_round(10, 10) == 1
    assert first_round(10, 0) == 11  # off: no round enters
    with pytest.raises(ValueError, match=r"swa-rounds=4 \(must be in \[0, rounds=3\]\)"):
        Settings(rounds=3, swa_rounds=4)


@pytest.fixture(scope="module")
def base(tiny_bert, glue_dir, tmp_path_factory):
    return Settings(task="sst2", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=3, train_limit=40,
                    eval_limit=16, batch_size=8, max_length=32, local_steps=2, lora_r=2, lr_schedule="constant",
                    lora_lr=3e-2, engine="local", algorithm="fedlora", out_dir=str(tmp_path_factory.mktemp("swa")))


def _model(path):
    return {f"{f.name}/{k}": v for f in (path / "model").glob("*.safetensors") for k, v in load_file(str(f)).items()}


@pytest.mark.slow
def test_the_exported_model_is_the_mean_of_the_last_rounds_models(base, tmp_path):
    # the same trajectory stopped after round 2 and after round 3 (constant rates: rounds changes nothing else)
    after_2 = run_federated(base.replace(rounds=2, out_dir=str(tmp_path / "two")), quiet=True)
    after_3 = run_federated(base.replace(out_dir=str(tmp_path / "three")), quiet=True)
    averaged = run_federated(base.replace(swa_rounds=2, out_dir=str(tmp_path / "swa")), quiet=True)
    assert comparable_rounds(averaged) == comparable_rounds(after_3)  # the rounds themselves are unchanged
    two, three, mean = _model(after_2), _model(after_3), _model(averaged)
    assert mean.keys() == three.keys()
    assert any(not torch.equal(two[k], three[k]) for k in three)  # the rounds moved the model
    for key in three:
        torch.testing.assert_close(mean[key], (two[key] + three[key]) / 2, rtol=0, atol=1e-6)
    summary = json.loads((averaged / "summary.json").read_text())
    assert summary["swa"]["rounds"] == 2
    assert summary["swa"]["dev_last_round"] == json.loads((after_3 / "summary.json").read_text())["dev"]
    assert summary["dev"] != summary["swa"]["dev_last_round"]


@pytest.mark.slow
def test_a_resumed_swa_run_equals_the_uninterrupted_one(base, resumed_run, tmp_path):
    settings = base.replace(swa_rounds=2)
    reference = run_federated(settings.replace(out_dir=str(tmp_path / "whole")), quiet=True)
    resumed = resumed_run(settings.replace(out_dir=str(tmp_path / "resumed")), 2)  # the mean holds round 2
    got, want = _model(resumed), _model(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((resumed / "summary.json").read_text())["dev"] == json.loads(
        (reference / "summary.json").read_text())["dev"]


def test_the_swa_remedy_averages_the_last_quarter_of_the_rounds():
    from fedtune.grid import remedy_changes

    assert remedy_changes("swa", Settings(rounds=10)) == {"swa_rounds": 2}
    assert remedy_changes("swa", Settings(rounds=33)) == {"swa_rounds": 8}
    assert remedy_changes("swa", Settings(rounds=3)) == {"swa_rounds": 1}
    assert remedy_changes("swa+ccvr-lda", Settings(rounds=33)) == {"swa_rounds": 8, "classifier_calibration": "ccvr-lda"}
