"""A decoder LM as the base, the shape of the bundled SmolLM2 (a Llama converted from GGUF, its own
byte-level tokenizer, pad token <|im_end|>, classification at the last non-pad token), through
every federated algorithm and every centralized method, each export evaluated without fedtune."""

import json

import pytest

from fedtune.centralized import run_centralized
from fedtune.config import Settings
from fedtune.runs import read_jsonl
from fedtune.simulation import run_federated

pytestmark = pytest.mark.slow  # the full tier (FULL=1 bash scripts/test.sh)

ALGORITHMS = {
    "fedavg": {}, "fedlora": {}, "ffa-lora": {}, "fedprox": {}, "fedadam": {}, "fedex-lora": {},
    "flexlora": {"client_ranks": "2,4,8"}, "hetlora": {"client_ranks": "2,4,8"}, "flora": {"client_ranks": "2,4,8"},
    "fedkdlora-server": {"algorithm": "fedkdlora", "kd_placement": "server", "teacher_epochs": 0.05},
    "fedkdlora-client": {"algorithm": "fedkdlora", "kd_placement": "client", "teacher_epochs": 0.05},
}


@pytest.fixture(scope="module")
def base(tiny_smollm, glue_dir, tmp_path_factory):
    return Settings(task="cola", glue_dir=str(glue_dir), model=tiny_smollm, clients=3, rounds=2, train_limit=60,
                    eval_limit=32, batch_size=8, max_length=32, local_steps=2, lora_r=4, full_lr=1e-3,
                    engine="local", precision="fp32", public_fraction=0.05,
                    out_dir=str(tmp_path_factory.mktemp("runs")))


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_trains_a_decoder_and_its_export_gives_the_reported_metrics(base, name, glue_dir,
                                                                                   evaluate_export):
    settings = base.replace(**{"algorithm": name, **ALGORITHMS[name]})
    path = run_federated(settings, quiet=True)
    rounds = read_jsonl(path / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[2]["bytes_up"] > 0
    reported = json.loads((path / "summary.json").read_text())["dev"]
    measured = evaluate_export(path, glue_dir)
    assert measured["accuracy"] == reported["accuracy"] and measured["mcc"] == pytest.approx(reported["mcc"], abs=1e-12)
    assert measured["loss"] == pytest.approx(reported["loss"], abs=1e-5)


@pytest.mark.parametrize("method", ["finetune", "lora", "kd"])
def test_every_centralized_method_trains_a_decoder(base, method, glue_dir, evaluate_export):
    path = run_centralized(base.replace(method=method, epochs=1, teacher_epochs=0.2), quiet=True)
    reported = json.loads((path / "summary.json").read_text())["dev"]
    measured = evaluate_export(path, glue_dir)
    assert measured["accuracy"] == reported["accuracy"] and measured["loss"] == pytest.approx(reported["loss"], abs=1e-5)
    config = json.loads((path / "model" / ("adapter_config.json" if method == "lora" else "config.json")).read_text())
    if method == "kd":  # the student keeps every other block of the 4-block teacher
        assert config["num_hidden_layers"] == 2 and config["pad_token_id"] == 2
