"""`fedtune predict` and `fedtune evaluate`: use any exported model (a run's `model/` folder).

An export is full weights (`from_pretrained`) or a PEFT adapter naming its base; the bundled
model's hub id resolves to the bundled copy, so both work offline. The task (label names, the
metric) and max-length come from the run's config.json next to `model/` when it is there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedtune.exports import described_task
from fedtune.tasks import task_spec


def run_settings(model_dir: Path) -> dict:
    """The run's settings (config.json beside model/), or {} for a folder from elsewhere."""
    from fedtune.runs import read_config

    config = Path(model_dir).parent / "config.json"
    return read_config(config) if config.is_file() else {}


def load_export(model_dir: Path):
    """(model in eval mode, tokenizer) of an export folder, or a clear error."""
    adapter = require_export(model_dir) / "adapter_config.json"
    try:
        return _load(model_dir, adapter)
    except Exception as err:  # noqa: BLE001  (transformers, peft, safetensors and tokenizers each raise their own)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ValueError(f"the exported model in {model_dir} could not be loaded ({first}); it is damaged or not "
                         f"a fedtune export") from None


def _load(model_dir: Path, adapter: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedtune.models import resolve_model_path

    if adapter.is_file():
        from peft import PeftModel

        try:
            base = resolve_model_path(json.loads(adapter.read_text())["base_model_name_or_path"])
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{adapter} is not a PEFT adapter config naming its base model ({err})") from None
        model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base), model_dir)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def require_export(model_dir: Path) -> Path:
    """`model_dir`, or a clear error when it holds no exported model."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist; give a run's model/ folder")
    if (model_dir / "model").is_dir() and (model_dir / "summary.json").is_file():
        raise ValueError(f"{model_dir} is a run folder; its exported model is {model_dir / 'model'}")
    if not (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no exported model (no config.json or adapter_config.json); "
                                f"give a run's model/ folder")
    return model_dir


def resolve_task(model_dir: Path, task: str | None) -> str:
    require_export(model_dir)
    trained_on = described_task(model_dir) or run_settings(model_dir).get("task")
    if task and trained_on and task != trained_on:
        raise ValueError(f"{model_dir} was trained on {trained_on} (its export.json or run's config.json), not {task}: "
                         f"drop --task, or give a model trained on {task}")
    task = task or trained_on
    if not task:
        raise ValueError(f"no run config.json beside {model_dir} says which task it was trained on: pass --task")
    task_spec(task)  # a clear error for an unknown task
    return task


@torch.inference_mode()
def predict(model_dir: Path, sentences: list[str], task: str | None = None) -> list[dict]:
    """Label and probability for each sentence."""
    task = resolve_task(model_dir, task)
    model, tokenizer = load_export(model_dir)
    max_length = run_settings(model_dir).get("max-length", 64)
    labels = task_spec(task).labels
    rows = []
    for start in range(0, len(sentences), 64):
        chunk = sentences[start:start + 64]
        batch = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        probabilities = model(**batch).logits.softmax(-1)
        for sentence, p in zip(chunk, probabilities):
            label = int(p.argmax())
            rows.append({"sentence": sentence, "label": labels[label], "label_id": label,
                         "probability": float(p[label])})
    return rows


def evaluate_export(model_dir: Path, task: str | None = None, tsv: Path | None = None,
                    glue_dir: str = "") -> dict[str, float]:
    """Loss and metrics on GLUE dev (or a labelled TSV in the task's GLUE format), computed as a
    run reports them (same batches: rows sorted by length, the run's evaluation batch size)."""
    from fedtune.data import _READERS, eval_loader, load_glue, tokenize
    from fedtune.train import evaluate

    task = resolve_task(model_dir, task)
    settings = run_settings(model_dir)
    if tsv is not None:
        if Path(tsv).is_dir():
            raise ValueError(f"--file {tsv} is a folder; give a labelled TSV file in the {task} GLUE format")
        if not Path(tsv).is_file():
            raise FileNotFoundError(f"--file {tsv} does not exist")
        from datasets import Dataset

        from fedtune.data import DataError

        try:
            columns = _READERS[task](Path(tsv))
        except UnicodeDecodeError as err:
            raise DataError(f"--file {tsv} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        if not columns["label"]:
            raise DataError(f"--file {tsv} has no labelled rows (a {task} GLUE TSV: "
                            f"{'sentence<TAB>label after a header' if task == 'sst2' else 'source, label, mark, sentence'})")
        rows = Dataset.from_dict(columns)
    else:
        rows = load_glue(task, glue_dir or settings.get("glue-dir", ""))["validation"]
        if settings.get("eval-limit"):  # as the run evaluated
            rows = rows.select(range(min(settings["eval-limit"], len(rows))))
    model, tokenizer = load_export(model_dir)
    data = tokenize(rows, tokenizer, settings.get("max-length", 64))
    return evaluate(model, eval_loader(data, tokenizer, settings.get("eval-batch-size", 128)), task)
