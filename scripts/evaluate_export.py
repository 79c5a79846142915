"""Load a fedtune export with plain transformers (+ peft for adapters) and evaluate it on a GLUE
dev file, without fedtune: the recipe for using a trained model anywhere.

    python scripts/evaluate_export.py runs/fedlora-sst2-<time>/model --task sst2 --glue-dir GLUE
    python scripts/evaluate_export.py MODEL_DIR --task cola --glue-dir GLUE --base /path/to/base

`model/` is either full weights (FedAvg, the KD students, FedEx-LoRA, FLoRA: `from_pretrained`)
or a PEFT adapter (the other LoRA methods) whose `adapter_config.json` names its base (a hub id,
e.g. sentence-transformers/all-MiniLM-L6-v2, or a folder; `--base` overrides it). Batches are
formed as fedtune evaluates (rows sorted by length, longest first), so the metrics equal the
run's summary.json. Prints JSON: loss, accuracy, mcc.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from sklearn.metrics import matthews_corrcoef
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def load(folder: Path, base: str | None = None):
    """(model, tokenizer) from an export folder."""
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base = base or json.loads(adapter.read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=2), folder)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def read_dev(path: Path, task: str) -> tuple[list[str], list[int]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task == "cola":  # no header: source, label, mark, sentence
        return [r[3] for r in rows], [int(r[1]) for r in rows]
    return [r[0] for r in rows[1:]], [int(r[1]) for r in rows[1:]]  # header: sentence, label


@torch.inference_mode()
def evaluate(model, tokenizer, sentences, labels, max_length=64, batch_size=128) -> dict[str, float]:
    ids = tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first, as fedtune evaluates
    pad = tokenizer.pad_token_id
    total, predictions, truth = 0.0, [], []
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in batch])
        mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in batch])
        target = torch.tensor([labels[i] for i in batch])
        out = model(input_ids=input_ids, attention_mask=mask, labels=target)
        total += out.loss.item() * len(batch)
        predictions += out.logits.argmax(-1).tolist()
        truth += target.tolist()
    accuracy = sum(p == t for p, t in zip(predictions, truth)) / len(truth)
    return {"loss": total / len(truth), "accuracy": accuracy, "mcc": float(matthews_corrcoef(truth, predictions))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="the export folder (a run's model/)")
    parser.add_argument("--task", choices=("cola", "sst2"), required=True)
    parser.add_argument("--glue-dir", type=Path, required=True, help="folder with CoLA/dev.tsv and SST-2/dev.tsv")
    parser.add_argument("--base", help="base model of an adapter (default: the one adapter_config.json names)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=0, help="first N dev rows only (the run's eval-limit)")
    args = parser.parse_args()
    sentences, labels = read_dev(args.glue_dir / {"cola": "CoLA", "sst2": "SST-2"}[args.task] / "dev.tsv", args.task)
    if args.limit:
        sentences, labels = sentences[:args.limit], labels[:args.limit]
    model, tokenizer = load(args.model, args.base)
    print(json.dumps(evaluate(model, tokenizer, sentences, labels, args.max_length, args.batch_size)))


if __name__ == "__main__":
    main()
