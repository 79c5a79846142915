"""Where and in what precision fedtune computes (`device`, `precision`).

Models live on the compute device; batches go there just before a step; every state that
travels or is stored (Flower messages, checkpoints, client state) is a CPU tensor, so runs on
different devices interoperate. On CPU with fp32 (the default here) nothing changes: no copy,
no autocast.
"""

from __future__ import annotations

import contextlib
import functools

import torch

DEVICES = "auto, cpu, cuda, cuda:N or mps"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@functools.lru_cache(maxsize=8)
def compute(device: str, precision: str) -> tuple[torch.device, str]:
    """(device, precision) a run computes with, from its `device` and `precision` settings."""
    resolved = resolve_device(device)
    return resolved, resolve_precision(precision, resolved)


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


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is fp32 on every device: bf16 is slow on most CPUs, and on an H200 bf16 autocast measured
    slower than fp32 for all-MiniLM-L6-v2 too (benchmarks/gpu.json: LoRA 1,314 vs 2,012 samples/s at
    batch 32, full fine-tuning 187 vs 2,280), so it is a choice (`bf16`, `fp16`) for larger models."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} (choose from: {', '.join(PRECISIONS)})")
    if precision == "auto":
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision=fp16 needs a CUDA device (its grad scaler is CUDA's); on {device.type} use "
                         f"bf16 or fp32")
    return precision


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
