"""Local training throughput: fedtune's loop vs a minimal PyTorch loop vs the matmul peak.

Every method trains the default model (all-MiniLM-L6-v2) on the same real SST-2 batches. FLOPs
are counted by `torch.utils.flop_counter.FlopCounterMode` on those batches (forward and
backward, padding included), so FLOP/s over this machine's matmul peak in the row's precision
(fp32, or bf16 for the autocast rows), measured in the same run, is the model-FLOP utilisation (MFU).
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedtune.algorithms import get_algorithm
from fedtune.config import Settings
from fedtune.data import cached_task_data, eval_loader, make_loader, tokenize
from fedtune.devices import autocast, compute, evaluation_precision, model_device, to_device, training_attention
from fedtune.distill import MutualDistillation
from fedtune.models import add_lora, load_classifier, load_tokenizer, make_student, set_attention
from fedtune.train import evaluate, seed_everything, supervised_loss, train


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(size: int = 2048, repeats: int = 10, device: torch.device = torch.device("cpu"),
                dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of a square matmul on `device` (on CPU: every core torch uses)."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def sst2_batches(settings: Settings, count: int, by_length: bool = False) -> list[dict[str, torch.Tensor]]:
    """`count` shuffled batches of real SST-2 private rows, padded per batch as fedtune does."""
    tokenizer = load_tokenizer(settings.model)
    rows = cached_task_data(settings).private
    loader = make_loader(tokenize(rows, tokenizer, settings.max_length), tokenizer, settings.batch_size,
                         shuffle=True, seed=settings.seed, by_length=by_length)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            return batches
    raise ValueError(f"only {len(batches)} batches in the data; lower the step count")


def combined_passes(step: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The forward passes one batched-clients step runs on a CPU over `step`, one right-padded batch
    per client (`lockstep.length_chunks`): the same rows and padding as the combined step, as
    batches for one model's raw loop (padded with id 0, masked)."""
    from fedtune.lockstep import CHUNK_TOKENS, _width, length_chunks

    return [{name: torch.cat([_width(step[k][name][i:i + 1], width, 0) for k, i in chunk])
             for name in ("input_ids", "attention_mask")}
            | {"labels": torch.stack([step[k]["labels"][i] for k, i in chunk])}
            for chunk, width in length_chunks(step, CHUNK_TOKENS)]


def build(method: str, settings: Settings):
    """(model, loss function) for one method, built by fedtune's own code paths, on settings.device."""
    model, loss_fn = _build(method, settings)
    return model.to(compute(settings.device, settings.precision, settings.models)[0]), loss_fn


def _build(method: str, settings: Settings):
    if method == "full":
        return get_algorithm("fedavg", settings).build_model(settings), supervised_loss
    if method == "lora":
        return get_algorithm("fedlora", settings).build_model(settings), supervised_loss
    # KD: FedKD's mutual distillation of a LoRA teacher (6 blocks) and a LoRA student (3 blocks).
    # Throughput does not depend on the weights, so the bundled model stands in for a pre-trained teacher.
    seed_everything(settings.seed)
    teacher = load_classifier(settings.model, 2, settings.seed)
    student = add_lora(make_student(teacher), settings.lora_r, settings.lora_alpha)
    teacher = add_lora(teacher, settings.lora_r, settings.lora_alpha)
    distiller = MutualDistillation(teacher, student, settings.kd_temperature)
    return distiller, lambda model, batch: model.loss(batch)


def lr_of(method: str, settings: Settings) -> float:
    return settings.full_lr if method.startswith("full") else settings.lora_lr


def count_flops(model, loss_fn, batches) -> int:
    """Forward + backward FLOPs of one pass over `batches` (no optimizer step)."""
    counter = FlopCounterMode(display=False)
    with counter:
        for batch in batches:
            loss_fn(model, to_device(batch, model_device(model))).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def raw_loop(model, loss_fn, batches, lr: float, precision: str = "fp32") -> float:
    """The minimal loop: AdamW, forward, backward, step (batches moved to the model's device as
    fedtune does, autocast unless fp32, the attention `train` uses there). Returns seconds."""
    if attention := training_attention(model_device(model), precision):
        set_attention(model, attention)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    device = model_device(model)
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        with autocast(device, precision):
            loss = loss_fn(model, to_device(batch, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return time.perf_counter() - start


def profile_shares(method: str, settings: Settings, steps: int = 10, top: int = 6,
                   precision: str = "fp32") -> dict[str, float]:
    """Share of the training step's CPU time per PyTorch operator (self time), largest first."""
    model, loss_fn = build(method, settings)
    batches = sst2_batches(settings, steps + 2)
    raw_loop(model, loss_fn, batches[:2], lr_of(method, settings), precision)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        raw_loop(model, loss_fn, batches[2:], lr_of(method, settings), precision)
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return {e.key: e.self_cpu_time_total / total for e in events[:top]}


def evaluation_seconds(settings: Settings) -> dict:
    """The server's evaluation of the whole SST-2 dev set: rows in file order vs sorted by length."""
    model, _ = build("lora", settings)
    # as the server evaluates
    precision = evaluation_precision(*compute(settings.device, settings.precision, settings.models))
    tokenizer = load_tokenizer(settings.model)
    dev = tokenize(cached_task_data(settings).validation, tokenizer, settings.max_length)
    loaders = {"file order": make_loader(dev, tokenizer, settings.eval_batch_size, shuffle=False),
               "sorted by length": eval_loader(dev, tokenizer, settings.eval_batch_size)}
    seconds = {}
    for name, loader in loaders.items():
        evaluate(model, loader, settings.task, precision)  # warm-up
        start = time.perf_counter()
        evaluate(model, loader, settings.task, precision)
        seconds[name] = time.perf_counter() - start
    return {"rows": len(dev), "seconds": seconds}


NO_DROPOUT, COMPILED = ", model-dropout 0", ", torch.compile"
# The compiled rows: `--compile 1` (nn.Module.compile: inductor, dynamic shapes).
METHODS = ("full", "lora", "kd", "lora by-length", "full" + NO_DROPOUT, "lora" + NO_DROPOUT,
           "lora by-length" + NO_DROPOUT, "lora by-length" + NO_DROPOUT + COMPILED)
# Measured again under bf16 autocast (what `precision auto` picks on a CPU whose bf16 pays).
BF16_METHODS = ("full", "lora", "kd", "lora by-length" + NO_DROPOUT, "lora by-length" + NO_DROPOUT + COMPILED)


def row_settings(method: str, settings: Settings) -> Settings:
    return settings.replace(model_dropout=0.0) if NO_DROPOUT in method else settings


def run(steps: int = 20, methods=METHODS, settings: Settings | None = None, bf16_methods=BF16_METHODS) -> dict:
    """Each method: fedtune's `train` and the raw loop over the same batches (by-length: batches
    from the length-grouped sampler, `batching by-length`; model-dropout 0: no dropout inside the
    model), in fp32, then `bf16_methods` again under bf16 autocast; each row's MFU is against the
    matmul peak of its own precision (both peaks measured at the start and the end, the better kept)."""
    settings = settings or Settings(task="sst2")
    device = compute(settings.device, "fp32")[0]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {name: matmul_peak(device=device, dtype=dtype) for name, dtype in dtypes.items()}
    batches = {False: sst2_batches(settings, steps + 2), True: sst2_batches(settings, steps + 2, by_length=True)}
    rows = []
    for method, precision in [(m, "fp32") for m in methods] + [(m, "bf16") for m in bf16_methods]:
        warmup, timed = batches["by-length" in method][:2], batches["by-length" in method][2:]
        model, loss_fn = build(method.split()[0].rstrip(","), row_settings(method, settings))
        lr = lr_of(method, settings)
        flops = count_flops(model, loss_fn, timed)
        if method.endswith(COMPILED):
            model.compile(dynamic=True)  # what `--compile 1` does
        raw_loop(model, loss_fn, warmup, lr, precision)  # warm-up (and compilation)
        samples = sum(len(b["labels"]) for b in timed)
        fedtune_seconds = train(model, timed, lr=lr, steps=len(timed), loss_fn=loss_fn, precision=precision).seconds
        raw_seconds = raw_loop(model, loss_fn, timed, lr, precision)
        rows.append({"method": method, "precision": precision, "samples": samples,
                     "padded_tokens": sum(int(b["attention_mask"].numel()) for b in timed),
                     "real_tokens": sum(int(b["attention_mask"].sum()) for b in timed),
                     "gflop": flops / 1e9, "fedtune_seconds": fedtune_seconds, "raw_seconds": raw_seconds,
                     "fedtune_samples_per_s": samples / fedtune_seconds, "raw_samples_per_s": samples / raw_seconds,
                     "fedtune_gflops": flops / 1e9 / fedtune_seconds, "raw_gflops": flops / 1e9 / raw_seconds})
    # the better of the two measurements: a conservative MFU
    peaks = {name: max(peak, matmul_peak(device=device, dtype=dtypes[name])) for name, peak in peaks.items()}
    for row in rows:
        row["mfu"] = row["fedtune_gflops"] / peaks[row["precision"]]
    return {"matmul_peak_gflops": peaks["fp32"], "matmul_peak_gflops_bf16": peaks["bf16"],
            "auto_precision": compute(settings.device, "auto")[1], "threads": torch.get_num_threads(),
            "batch_size": settings.batch_size, "max_length": settings.max_length, "rows": rows,
            "evaluation": evaluation_seconds(settings), "lora_profile": profile_shares("lora", settings),
            "lora_profile_no_dropout": profile_shares("lora", settings.replace(model_dropout=0.0)),
            "lora_profile_bf16": profile_shares("lora", settings.replace(model_dropout=0.0), precision="bf16")}
