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


# One export of each kind is evaluated outside fedtune (the BERT contract tests check every
# algorithm's): an adapter, full weights, a base with updates merged in, a merged KD student.
EXPORT_CHECKED = ("fedlora", "fedavg", "flora", "fedkdlora-client")


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_trains_a_decoder_and_its_export_gives_the_reported_metrics(base, name, glue_dir,
                                                                                   evaluate_export):
    settings = base.replace(**{"algorithm": name, **ALGORITHMS[name]})
    path = run_federated(settings, quiet=True)
    rounds = read_jsonl(path / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[2]["bytes_up"] > 0
    assert all(0.0 <= r["dev_accuracy"] <= 1.0 and r["dev_loss"] > 0 for r in rounds)
    if name not in EXPORT_CHECKED:
        return
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


@pytest.mark.parametrize("placement", ["server", "client"])
def test_a_decoder_teacher_distils_into_a_bert_student_and_only_the_student_travels(base, placement, tiny_bert,
                                                                                    glue_dir, evaluate_export):
    """Cross-model FedKDLoRA: the teacher (the Llama, its byte-level tokenizer) and the student (a
    BERT with WordPiece) each read the rows in their own token ids; what travels is exactly what a
    Fed-LoRA run of the BERT sends, and the export is a BERT with BERT's tokenizer."""
    kd = base.replace(algorithm="fedkdlora", kd_placement=placement, teacher_epochs=0.05, student=tiny_bert)
    path = run_federated(kd, quiet=True)
    fedlora = run_federated(base.replace(algorithm="fedlora", model=tiny_bert), quiet=True)
    kd_rounds, lora_rounds = read_jsonl(path / "rounds.jsonl"), read_jsonl(fedlora / "rounds.jsonl")
    assert kd_rounds[-1]["travelling_parameters"] == lora_rounds[-1]["travelling_parameters"]
    for a, b in zip(kd_rounds[1:], lora_rounds[1:]):
        # The same tensors down; up, client teachers also report their dev metrics (a few hundred bytes).
        assert abs(a["bytes_down"] - b["bytes_down"]) <= 3 * 32
        assert 0 <= a["bytes_up"] - b["bytes_up"] + 3 * 32 <= (3 * 32 if placement == "server" else 3 * 32 + 3 * 400)
    assert all(r["teacher_dev_accuracy"] is not None for r in kd_rounds[1:])
    config = json.loads((path / "model" / "config.json").read_text())
    assert config["model_type"] == "bert" and config["id2label"] == {"0": "unacceptable", "1": "acceptable"}
    assert json.loads((path / "model" / "tokenizer_config.json").read_text())["tokenizer_class"].startswith("Bert")
    reported = json.loads((path / "summary.json").read_text())["dev"]
    measured = evaluate_export(path, glue_dir)
    assert measured["accuracy"] == reported["accuracy"] and measured["loss"] == pytest.approx(reported["loss"], abs=1e-5)


def test_centralized_kd_from_a_decoder_teacher_into_a_bert_student(base, tiny_bert, glue_dir, evaluate_export):
    path = run_centralized(base.replace(method="kd", student=tiny_bert, epochs=1, teacher_epochs=0.2), quiet=True)
    assert json.loads((path / "model" / "config.json").read_text())["model_type"] == "bert"
    reported = json.loads((path / "summary.json").read_text())["dev"]
    measured = evaluate_export(path, glue_dir)
    assert measured["accuracy"] == reported["accuracy"] and measured["loss"] == pytest.approx(reported["loss"], abs=1e-5)


def test_hidden_state_kd_across_tokenizers_is_refused_before_any_round(base, tiny_bert):
    from fedtune.algorithms import get_algorithm

    settings = base.replace(algorithm="fedkdlora", student=tiny_bert, kd_hidden_weight=1.0)
    with pytest.raises(ValueError, match="kd-hidden-weight compares hidden states token by token"):
        get_algorithm("fedkdlora", settings).check_settings()
