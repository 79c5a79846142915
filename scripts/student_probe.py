"""How much of a decoder does a KD student cut from it keep? Each cut's language-model loss.

    GLUE_DIR=../shared/data/glue python scripts/student_probe.py --task cola --model smollm2 --layers 10 20

Builds, from the pre-trained model (no fine-tuning) with its language-model head, the whole model
and a student of each `--layers` count with each `student-blocks` choice (`even`, `first`), and
reports the mean next-token loss (nats per token) and its perplexity on `--rows` private train
sentences (never GLUE dev). A cut whose loss stays near the whole model's kept the network
working; one far above it (the unigram level of a 49k vocabulary is about 7-8 nats) hands the
federation a broken network that LoRA on q/v has to repair.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import AutoModelForCausalLM

from fedtune.config import Settings
from fedtune.data import cached_task_data
from fedtune.models import kept_blocks, load_tokenizer, make_student, resolve_model_path


def lm_loss(model, tokenizer, sentences: list[str], batch_size: int = 32) -> float:
    """Mean next-token negative log-likelihood over every predicted token of `sentences`."""
    total, tokens = 0.0, 0
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start:start + batch_size], return_tensors="pt", padding=True)
        logits = model(**batch).logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                                   reduction="sum").item()
        tokens += int((targets != -100).sum())
    return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="cola")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layers", type=int, nargs="+", default=[10])
    parser.add_argument("--rows", type=int, default=500, help="private train sentences scored")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    settings = Settings(task=args.task, model=args.model, precision="fp32")
    sentences = cached_task_data(settings).private.shuffle(seed=0).select(range(args.rows))["sentence"]
    tokenizer = load_tokenizer(args.model)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), torch_dtype=torch.float32).eval()
    blocks = model.config.num_hidden_layers
    print(f"{args.model} ({blocks} blocks), {args.rows} private {args.task} sentences\n\n"
          "| network | blocks kept | LM loss (nats / token) | perplexity | seconds |\n|---|---|---:|---:|---:|", flush=True)
    candidates = [("whole model", None, None)]
    candidates += [(f"{n} blocks, {choice}", n, choice) for n in args.layers for choice in ("even", "first")]
    for name, layers, choice in candidates:
        start = time.time()
        student = model if layers is None else make_student(model, layers, choice)
        loss = lm_loss(student, tokenizer, sentences)
        kept = "all" if layers is None else ",".join(map(str, kept_blocks(blocks, layers, choice)))
        print(f"| {name} | {kept} | {loss:.3f} | {math.exp(loss):,.0f} | {time.time() - start:.0f} |", flush=True)
        del student


if __name__ == "__main__":
    main()
