"""Centralized baselines: full fine-tuning, LoRA, and knowledge distillation into a LoRA student.

All three train on the private rows (train minus the public slice): the same data a
federation holds in total, so centralized and federated numbers compare directly.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fedtune.config import Settings
from fedtune.console import print_table, progress_bar, say, warn
from fedtune.data import cached_task_data, eval_loader, task_spec, tokenize, train_loader
from fedtune.devices import compute, evaluation_precision
from fedtune.metrics import learned_nothing, primary_metric
from fedtune.inputs import check_out_dir
from fedtune.exports import describe
from fedtune.models import HUB_IDS, add_lora, count_parameters, load_classifier, load_tokenizer, save_merged, save_model
from fedtune.runs import RunDir
from fedtune.distill import split_inputs
from fedtune.teacher import build_student, load_teacher, pretrain_teacher, teacher_dir, teacher_metrics, teacher_tokenizer
from fedtune.train import distillation_losses, evaluate, seed_everything, steps_for, train


def kd_loss_fn(teacher: torch.nn.Module, temperature: float):
    """Loss for a student learning from a frozen teacher (FedKD's adaptive weighting)."""
    teacher.eval()

    def loss_fn(student: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        teacher_batch, batch = split_inputs(batch)  # each model reads its own token ids
        with torch.no_grad():
            teacher_logits = teacher(**teacher_batch).logits
        student_logits = student(**batch).logits
        return distillation_losses(teacher_logits, student_logits, batch["labels"], temperature)[1]

    return loss_fn


def build_model(settings: Settings, quiet: bool = False):
    """(model to train, learning rate, loss function) for the centralized method."""
    num_labels, labels = task_spec(settings.task).num_labels, task_spec(settings.task).labels
    lora = dict(r=settings.lora_r, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
                targets=settings.lora_targets)
    if settings.method == "finetune":
        return (load_classifier(settings.model, num_labels, settings.seed, settings.model_dropout, labels),
                settings.full_lr, None)
    if settings.method == "lora":
        return (add_lora(load_classifier(settings.model, num_labels, settings.seed, settings.model_dropout, labels),
                         **lora), settings.lora_lr, None)
    if settings.method == "kd":
        device = compute(settings.device, settings.precision, settings.models)[0]
        teacher = load_teacher(pretrain_teacher(settings, quiet)).to(device)
        student = add_lora(build_student(settings, teacher), **lora)
        return student, settings.lora_lr, kd_loss_fn(teacher, settings.kd_temperature)
    raise ValueError(f"unknown method {settings.method!r} (known: finetune, lora, kd)")


def run_centralized(settings: Settings, quiet: bool = False) -> Path:
    """Train one centralized baseline; returns the finished run folder."""
    check_out_dir(settings.out_dir)
    data = cached_task_data(settings)
    kd = settings.method == "kd"
    reader = settings.trained_model(kd)
    tokenizer = load_tokenizer(reader)
    device, precision = compute(settings.device, settings.precision, settings.models)
    model, lr, loss_fn = build_model(settings, quiet)
    model.to(device)
    seed_everything(settings.seed)
    batches = train_loader(data.private, tokenizer, settings, settings.seed,
                           teacher_tokenizer=teacher_tokenizer(settings) if kd else None)
    dev_loader = eval_loader(tokenize(data.validation, tokenizer, settings.max_length), tokenizer,
                             settings.eval_batch_size)
    run = RunDir(settings.out_dir, f"centralized-{settings.method}-{settings.task}", settings)
    trainable, total = count_parameters(model)
    say(f"[bold]{settings.method}[/] on {settings.task}: {len(data.private)} train rows, "
        f"{trainable:,} of {total:,} parameters train -> {run.path}", quiet)

    # Evaluate at every epoch boundary and at the end of training.
    steps = steps_for(len(batches), settings.epochs)
    checkpoints = {min(steps, e * len(batches)) for e in range(1, int(settings.epochs) + 1)} | {steps}
    history = []

    def on_step(step: int, mean_loss: float, examples: int) -> None:
        update(step)
        if step in checkpoints:
            dev = evaluate(model, dev_loader, settings.task, evaluation_precision(device, precision, step == steps))
            record = {"epoch": round(step / len(batches), 3), "step": step, "train_loss": mean_loss,
                      **{f"dev_{k}": v for k, v in dev.items()},
                      "samples": examples, "seconds": time.perf_counter() - start}
            history.append(record)
            run.append_jsonl("epochs.jsonl", record)

    start = time.perf_counter()
    with progress_bar(steps, f"{settings.method} {settings.task}", quiet) as update:
        result = train(model, batches, lr=lr, steps=steps, schedule=settings.lr_schedule,
                       weight_decay=settings.weight_decay, on_step=on_step, precision=precision,
                       compile=bool(settings.compile),
                       **({"loss_fn": loss_fn} if loss_fn else {}))
    if settings.method == "kd":  # the student's own architecture, merged: see FedKDLoRA.save_model
        save_merged(model, run.path / "model")
    else:
        save_model(model, run.path / "model")
    tokenizer.save_pretrained(run.path / "model")
    final = history[-1]
    # KD: the teacher's own metrics on the same evaluation set (as fedkdlora rows report theirs)
    teacher_dev = teacher_metrics(teacher_dir(settings)) if settings.method == "kd" else None
    summary = {"method": settings.method, "task": settings.task,
                                    "metric": primary_metric(settings.task),
                                    "dev": {k[4:]: v for k, v in final.items() if k.startswith("dev_")},
                                    "teacher_dev": teacher_dev,
                                    "train_samples": result.examples, "seconds": final["seconds"],
                                    "trainable_parameters": trainable, "total_parameters": total,
                                    "precision": precision,
                                    "epochs": history, "settings": settings.non_default()}
    summary["learned_nothing"] = learned_nothing(summary["dev"])
    run.write_json("summary.json", summary)
    describe(run.path / "model", settings.to_dict(), summary, task_spec(settings.task).labels,
             HUB_IDS.get(reader, reader))
    path = run.finish()
    print_table(f"{settings.method} on {settings.task}", [_row(r) for r in history], quiet)
    if problem := summary["learned_nothing"]:
        warn(f"centralized {settings.method} on {settings.task}: {problem}")
    say(f"saved {path}", quiet)
    return path


_CONSOLE = {"dev_loss": "loss", "dev_accuracy": "acc", "dev_mcc": "mcc", "dev_balanced_accuracy": "bal",
            "dev_worst_class_recall": "worst", "dev_auc": "auc"}


def _row(record: dict) -> dict:
    """A compact console row (an 80-column terminal shows it whole; epochs.jsonl keeps everything)."""
    row = {"epoch": f"{record['epoch']:g}", "step": str(record["step"]), "train": f"{record['train_loss']:.3f}"}
    row.update({short: f"{record[key]:.3f}" for key, short in _CONSOLE.items() if key in record})
    row["samples"] = str(record["samples"])
    row["s"] = f"{record['seconds']:.0f}"
    return row
