"""Where and in what precision fedtune computes (`device`, `precision`).

Models live on the compute device; batches go there just before a step; every state that
travels or is stored (Flower messages, checkpoints, client state) is a CPU tensor, so runs on
different devices interoperate. On CPU with fp32 (the default here) nothing changes: no copy,
no autocast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from pathlib import Path

import torch

from fedtune.bundled import MODELS, bundled_name, cache_dir

DEVICES = "auto, cpu, cuda, cuda:N or mps"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@functools.lru_cache(maxsize=8)
def compute(device: str, precision: str, models: tuple[str, ...] = ()) -> tuple[torch.device, str]:
    """(device, precision) a run computes with, from its `device` and `precision` settings and the
    models it trains (`Settings.models`)."""
    resolved = resolve_device(device)
    return resolved, resolve_precision(precision, resolved, models)


def resolve_device(spec: str) -> torch.device:
    """`auto`: CUDA if present, else MPS, else CPU; otherwise the device named, if it is there."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device={spec!r} is not a device (choose from: {DEVICES})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(f"device={spec!r} was asked for, but this machine has {count} CUDA device(s) "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); "
                             f"use --device auto or cpu")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device={spec!r} was asked for, but MPS (Apple GPU) is not available here; "
                             f"use --device auto or cpu")
    elif device.type != "cpu":
        raise ValueError(f"device={spec!r} is not supported (choose from: {DEVICES})")
    return device


def resolve_precision(precision: str, device: torch.device, models: tuple[str, ...] = ()) -> str:
    """`auto` is bf16 (autocast) on a CPU whose bf16 matmuls measured at least `BF16_MARGIN` times
    fp32's (AMX, or AVX512-BF16: see `cpu_bf16_pays`), fp32 on other CPUs and on GPUs (on an H200
    bf16 autocast measured slower than fp32 for all-MiniLM-L6-v2: benchmarks/gpu.json, LoRA 1,314 vs
    2,012 samples/s at batch 32, full fine-tuning 187 vs 2,280). Weights, what travels and what is
    saved stay fp32 either way; a CPU run's final evaluation is fp32 (`evaluation_precision`). `auto` is fp32
    too when one of `models` is a bundled model measured to train worse in bf16 (`auto_bf16`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} (choose from: {', '.join(PRECISIONS)})")
    if precision == "auto":
        if any((name := bundled_name(m)) and not MODELS[name].auto_bf16 for m in models):
            return "fp32"
        return "bf16" if device.type == "cpu" and cpu_bf16_pays() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision=fp16 needs a CUDA device (its grad scaler is CUDA's); on {device.type} use "
                         f"bf16 or fp32")
    return precision


def evaluation_precision(device: torch.device, precision: str, final: bool = True) -> str:
    """Precision of an evaluation. On a GPU: the training precision. On a CPU: fp32 for a run's
    final evaluation (what it reports and exports: an fp32 evaluation of the fp32 weights gives
    exactly what plain transformers reports for the export), the training precision for the
    evaluations along the way (each round's, each epoch's, a teacher's, which is never exported):
    in bf16 they cost a third of fp32's (SST-2 dev on all-MiniLM-L6-v2, one thread: 2.5 s vs 7 s)
    and move its accuracy by about one row in a thousand."""
    return "fp32" if device.type == "cpu" and final else precision


BF16_MARGIN = 1.5  # bf16 matmuls must be this many times faster than fp32 for `auto` to train in bf16
PROBE_SHAPE = (640, 384, 1536)  # an FFN matmul of all-MiniLM-L6-v2 at batch 32 x 20 tokens


def cpu_bf16_pays() -> bool:
    """Whether bf16 matmuls run at least `BF16_MARGIN` times fp32's on this CPU. Measured once per
    machine (one thread, `PROBE_SHAPE`, the two dtypes in alternation: `matmul_speeds`) and kept in
    `<cache>/cpu-precision.json`, keyed by the CPU model and torch version, so every process of a
    run (the server, Ray's actors) and every later run resolves `auto` the same way; the cache is
    `$FEDTUNE_CACHE` or ~/.cache/fedtune."""
    return _probe()["bf16_gflops"] >= BF16_MARGIN * _probe()["fp32_gflops"]


@functools.cache
def _probe() -> dict:
    # "interleaved": measurements before the two dtypes were timed in alternation are measured again
    # (one taken while other runs loaded the CPU had recorded bf16 at 1.08x fp32 on a CPU where it is 2x).
    key = f"{platform.machine()} {_cpu_model()} torch {torch.__version__} interleaved"
    path = cache_dir() / "cpu-precision.json"
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") == key and all(isinstance(saved.get(k), (int, float)) and saved[k] > 0
                                           for k in ("bf16_gflops", "fp32_gflops")):
            return saved
    except (OSError, ValueError, AttributeError):
        pass  # missing or damaged: measure again
    speeds = matmul_speeds((torch.float32, torch.bfloat16))
    measured = {"key": key, "shape": list(PROBE_SHAPE), "fp32_gflops": speeds[torch.float32],
                "bf16_gflops": speeds[torch.bfloat16], "load_average": os.getloadavg()[0]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(measured, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: this process keeps its measurement
    return measured


def matmul_speeds(dtypes: tuple[torch.dtype, ...], shape: tuple[int, int, int] = PROBE_SHAPE,
                  seconds: float = 0.4) -> dict[torch.dtype, float]:
    """Best GFLOP/s of one-thread CPU matmuls of `shape` in each of `dtypes`, over about `seconds`.
    The dtypes take turns, one matmul each, so that other work on the machine slows them alike and
    their ratio holds on a busy machine (timed one after the other, a load that came or went between
    them decided the ratio)."""
    m, k, n = shape
    operands = {dtype: (torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)) for dtype in dtypes}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for a, b in operands.values():
            torch.mm(a, b)  # warm-up (the first bf16 call builds its kernel)
        best, deadline = dict.fromkeys(dtypes, float("inf")), time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for dtype, (a, b) in operands.items():
                start = time.perf_counter()
                torch.mm(a, b)
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {dtype: 2 * m * k * n / best[dtype] / 1e9 for dtype in dtypes}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def training_attention(device: torch.device, precision: str) -> str | None:
    """The attention implementation a model trains with, or None to keep the model's own (SDPA).

    On a CPU under bf16 autocast, PyTorch's fused SDPA attention is slow in the backward pass
    (`_scaled_dot_product_flash_attention_for_cpu_backward` took 38% of a MiniLM LoRA step on this
    project's AMD EPYC, more than the matmuls), while the plain matmul-softmax-matmul attention
    runs on the bf16 units: a MiniLM LoRA step measured 236 samples/s with eager attention against
    157 with SDPA (by-length batches, model-dropout 0; padded batches 145 against 92). fp32 and
    GPUs keep SDPA."""
    return "eager" if device.type == "cpu" and precision == "bf16" else None


def autocast(device: torch.device, precision: str):
    """The autocast context of a forward pass (none for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on `device` (the same dict when it is already there)."""
    if all(t.device == device for t in batch.values()):
        return batch
    return {k: t.to(device, non_blocking=True) for k, t in batch.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
