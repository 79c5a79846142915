"""The teacher (pre-trained on the public slice, cached on disk) and the student derived from it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from transformers import AutoModelForSequenceClassification, PreTrainedModel

from fedtune.config import Settings
from fedtune.console import progress_bar, say
from fedtune.data import cached_task_data, eval_loader, task_spec, tokenize, train_loader
from fedtune.devices import compute, evaluation_precision
from fedtune.models import load_classifier, load_tokenizer, make_student, same_tokenizer
from fedtune.train import evaluate, seed_everything, steps_for, train

# The settings that decide the teacher's weights; anything else may change and reuse it.
TEACHER_KEYS = ("task", "glue-dir", "max-length", "public-fraction", "model", "full-lr", "weight-decay",
                "batch-size", "lr-schedule", "teacher-epochs", "seed")


def teacher_settings(settings: Settings) -> dict:
    """The settings that decide the teacher, with the GLUE folder resolved."""
    resolved = {**settings.to_dict(), "glue-dir": settings.resolved_glue_dir}
    # Keys added later count only when not at their default, so older teachers stay valid. The
    # holdout does not change the teacher's weights, but its recorded metrics are on the holdout.
    keys = TEACHER_KEYS + tuple(k for k in ("batching", "holdout-fraction", "model-dropout") if resolved[k] != Settings().to_dict()[k])
    chosen = {k: resolved[k] for k in keys}
    # The precision it trains in, as resolved here (`auto` is bf16 on some CPUs), as the grid's cells
    # are keyed: a bf16 teacher is not an fp32 one. fp32 adds nothing, so fp32 teachers keep their folders.
    if (precision := compute(settings.device, settings.precision, settings.models)[1]) != "fp32":
        chosen["precision"] = precision
    return chosen


def teacher_dir(settings: Settings) -> Path:
    key = json.dumps(teacher_settings(settings), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(settings.out_dir) / "teachers" / f"{settings.task}-{digest}"


def pretrain_teacher(settings: Settings, quiet: bool = False) -> Path:
    """Fully fine-tune the teacher on the public slice, once; later calls reuse the folder."""
    folder = teacher_dir(settings)
    if (folder / "teacher.json").is_file():
        say(f"reusing teacher {folder}", quiet)
        return folder
    data = cached_task_data(settings)
    if len(data.public) == 0:
        raise ValueError("public-fraction is 0, so there is no public slice to pre-train the teacher on")
    tokenizer = load_tokenizer(settings.model)
    seed_everything(settings.seed)
    device, precision = compute(settings.device, settings.precision, settings.models)
    model = load_classifier(settings.model, task_spec(settings.task).num_labels, settings.seed, settings.model_dropout,
                            task_spec(settings.task).labels).to(device)
    loader = train_loader(data.public, tokenizer, settings, settings.seed)
    steps = steps_for(len(loader), settings.teacher_epochs)
    with progress_bar(steps, "teacher on public slice", quiet) as update:
        result = train(model, loader, lr=settings.full_lr, steps=steps, schedule=settings.lr_schedule,
                       weight_decay=settings.weight_decay,
                       on_step=lambda step, *_: update(step), precision=precision)
    metrics = evaluate(model, eval_loader(tokenize(data.validation, tokenizer, settings.max_length), tokenizer,
                                          settings.eval_batch_size), settings.task,
                       evaluation_precision(device, precision))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    summary = {"settings": teacher_settings(settings), "train_loss": result.loss,
               "examples": result.examples, "seconds": result.seconds, "dev": metrics}
    (tmp / "teacher.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    say(f"teacher saved to {folder}: dev {metrics}", quiet)
    return folder


def teacher_metrics(folder: Path) -> dict[str, float]:
    """The teacher's dev metrics from its teacher.json, checked (one error naming the file)."""
    path = Path(folder) / "teacher.json"
    try:
        dev = json.loads(path.read_text(encoding="utf-8"))["dev"]
        if not isinstance(dev, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in dev.values()):
            raise TypeError("'dev' is not an object of numbers")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); delete {folder} and the teacher is "
                         f"trained again") from None
    return dev


def require_teacher(settings: Settings) -> Path:
    """The pre-trained teacher's folder for `settings`, or a clear error if it is not there."""
    folder = teacher_dir(settings)
    if not (folder / "teacher.json").is_file():
        raise FileNotFoundError(f"no pre-trained teacher at {folder} for these settings; run `fedtune teacher` "
                                f"with the same settings first (a fedkdlora server does it before round 1)")
    return folder


def load_teacher(folder: Path) -> PreTrainedModel:
    return AutoModelForSequenceClassification.from_pretrained(folder)


def teacher_tokenizer(settings: Settings):
    """The teacher's tokenizer when the student reads other token ids (a `student` model of
    another family): distillation batches then carry both readings of each row. None otherwise."""
    if settings.student and not same_tokenizer(settings.model, settings.student):
        return load_tokenizer(settings.model)
    return None


def build_student(settings: Settings, teacher: PreTrainedModel) -> PreTrainedModel:
    """The given `student` model (any tokenizer), or the teacher with `student-layers` of its blocks."""
    if not settings.student:
        return make_student(teacher, settings.student_layers, settings.student_blocks)
    return load_classifier(settings.student, task_spec(settings.task).num_labels, settings.seed, settings.model_dropout,
                           task_spec(settings.task).labels)
