"""Centralized baselines on tiny models and real CoLA rows; one smoke test with the real default model."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from fedtune.centralized import run_centralized
from fedtune.config import Settings
from fedtune.runs import read_jsonl
from fedtune.teacher import teacher_dir


@pytest.fixture
def settings(tiny_bert, glue_dir, tmp_path):
    return Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, train_limit=64, eval_limit=32,
                    batch_size=16, max_length=32, epochs=2, lora_r=4, out_dir=str(tmp_path), full_lr=1e-3,
                    public_fraction=0.02, teacher_epochs=0.5)


def _logits(model, tokenizer_dir):
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(tokenizer_dir)(["the cat sat", "cat the sat sat"], return_tensors="pt",
                                                          padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_finetune_writes_a_loadable_model_and_epoch_metrics(settings, capsys):
    from fedtune.metrics import learned_nothing

    path = run_centralized(settings.replace(method="finetune"), quiet=True)
    epochs = read_jsonl(path / "epochs.jsonl")
    assert [e["epoch"] for e in epochs] == [1.0, 2.0]
    assert epochs[-1]["samples"] == 2 * 64
    summary = json.loads((path / "summary.json").read_text())
    assert set(summary["dev"]) == {"loss", "accuracy", "mcc", "auc", "balanced_accuracy", "worst_class_recall"}
    # A model that gets one class never right says so, even under --quiet (64 rows: it may well be one)
    assert summary["learned_nothing"] == learned_nothing(summary["dev"])
    assert ("learned" in capsys.readouterr().err) == (summary["dev"]["worst_class_recall"] == 0)
    model = AutoModelForSequenceClassification.from_pretrained(path / "model")
    assert _logits(model, path / "model").shape == (2, 2)


def test_lora_adapter_reloads_to_the_same_predictions(settings, tiny_bert):
    from fedtune.models import load_classifier

    path = run_centralized(settings.replace(method="lora"), quiet=True)
    reloaded = PeftModel.from_pretrained(load_classifier(tiny_bert, 2, seed=123), path / "model")
    # The head was trained and saved with the adapter, so a differently seeded base head does not matter.
    first = _logits(reloaded, tiny_bert)
    again = _logits(PeftModel.from_pretrained(load_classifier(tiny_bert, 2, seed=7), path / "model"), tiny_bert)
    assert torch.allclose(first, again)


def test_kd_pretrains_the_teacher_once_and_reuses_it(settings):
    kd = settings.replace(method="kd")
    run_centralized(kd, quiet=True)
    folder = teacher_dir(kd)
    stamp = (folder / "teacher.json").stat().st_mtime_ns
    path = run_centralized(kd.replace(lora_r=2), quiet=True)  # student settings change; teacher does not
    assert (folder / "teacher.json").stat().st_mtime_ns == stamp
    summary = json.loads((path / "summary.json").read_text())
    assert summary["method"] == "kd"
    # the teacher's dev metrics travel with the student's summary, as the compare table's "teacher" column reads them
    assert summary["teacher_dev"] == json.loads((folder / "teacher.json").read_text())["dev"]
    assert set(summary["teacher_dev"]) == set(summary["dev"])


def test_a_failed_run_leaves_no_complete_looking_folder(settings, monkeypatch, tmp_path):
    import fedtune.centralized

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fedtune.centralized, "evaluate", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_centralized(settings.replace(method="lora"), quiet=True)
    folders = [p.name for p in tmp_path.iterdir()]
    assert folders and all(name.endswith(".incomplete") for name in folders)


def test_smoke_default_model_on_a_few_dozen_cola_rows(glue_dir, tmp_path):
    settings = Settings(task="cola", glue_dir=str(glue_dir), train_limit=48, eval_limit=48, epochs=1,
                        out_dir=str(tmp_path), method="lora")
    summary = json.loads((run_centralized(settings, quiet=True) / "summary.json").read_text())
    assert summary["trainable_parameters"] < 0.01 * summary["total_parameters"]
    assert 0.0 <= summary["dev"]["accuracy"] <= 1.0 and -1.0 <= summary["dev"]["mcc"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["finetune", "lora", "kd"])
def test_export_loads_without_fedtune_and_gives_the_reported_metrics(settings, method, glue_dir, evaluate_export):
    path = run_centralized(settings.replace(method=method), quiet=True)
    reported = json.loads((path / "summary.json").read_text())["dev"]
    measured = evaluate_export(path, glue_dir)
    assert measured["accuracy"] == reported["accuracy"] and measured["mcc"] == pytest.approx(reported["mcc"], abs=1e-12)
    assert measured["loss"] == pytest.approx(reported["loss"], abs=1e-5)
    if method == "kd":  # the student's own depth travels with it (the tiny teacher has 4 blocks)
        assert json.loads((path / "model" / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.slow
def test_bundled_model_adapter_names_its_hub_id_and_loads_from_a_hub_cache(glue_dir, tmp_path, evaluate_export):
    """On another machine the base comes from the hub: a hub cache holding the model (made here from
    the bundled files, in a folder that is not the virtualenv's) is all the export needs."""
    import shutil

    from fedtune.models import HUB_IDS, resolve_model_path

    settings = Settings(task="cola", glue_dir=str(glue_dir), train_limit=32, eval_limit=32, epochs=1,
                        out_dir=str(tmp_path / "runs"), method="lora", max_length=32)
    path = run_centralized(settings, quiet=True)
    config = json.loads((path / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_IDS["minilm"] == "sentence-transformers/all-MiniLM-L6-v2"
    snapshot = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / ("0" * 40)
    shutil.copytree(resolve_model_path("minilm"), snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    measured = evaluate_export(path, glue_dir, extra_env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert measured["accuracy"] == json.loads((path / "summary.json").read_text())["dev"]["accuracy"]


def test_predict_and_evaluate_use_an_export_as_the_run_reported_it(settings, capsys, tmp_path):
    from fedtune.cli import main

    path = run_centralized(settings.replace(method="lora"), quiet=True)
    assert main(["evaluate", str(path / "model")]) == 0  # task, GLUE folder and eval-limit from the run
    measured = json.loads(capsys.readouterr().out)
    reported = json.loads((path / "summary.json").read_text())["dev"]
    assert measured["accuracy"] == reported["accuracy"] and measured["loss"] == pytest.approx(reported["loss"], abs=1e-6)

    sentences = tmp_path / "sentences.txt"
    sentences.write_text("The cat sat on the mat.\n\nMat the on sat cat the.\n")
    assert main(["predict", str(path / "model"), "Who did you see?", "--file", str(sentences), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["sentence"] for r in rows] == ["Who did you see?", "The cat sat on the mat.", "Mat the on sat cat the."]
    assert all(r["label"] in ("unacceptable", "acceptable") and 0.5 <= r["probability"] <= 1.0 for r in rows)

    assert main(["predict", str(tmp_path), "x"]) == 2  # not a model: one clear error
    assert "holds no exported model" in capsys.readouterr().err


def test_an_export_describes_itself_and_predict_needs_no_task_elsewhere(settings, tmp_path, capsys):
    """id2label in the exported config, a model card, export.json: a model folder copied anywhere
    (no run config.json beside it) still knows its task and label names."""
    import shutil

    from fedtune.centralized import run_centralized
    from fedtune.cli import main

    path = run_centralized(settings.replace(method="finetune", out_dir=str(tmp_path / "runs")), quiet=True)
    config = json.loads((path / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "unacceptable", "1": "acceptable"}
    card = (path / "model" / "README.md").read_text()
    assert "GLUE cola" in card and "centralized finetune" in card and "fedtune centralized" in card
    copied = tmp_path / "elsewhere" / "my-model"
    shutil.copytree(path / "model", copied)
    assert main(["predict", str(copied), "a sentence", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["label"] in ("unacceptable", "acceptable")
    assert main(["predict", str(copied), "--task", "sst2", "a sentence"]) == 2  # not what it was trained on
    assert "was trained on cola" in capsys.readouterr().err
