"""The server's checkpoint: data only, never code.

One safetensors file, `checkpoint.safetensors`, replaced atomically after every round:
- tensors `global/<key>` (the global trainable state), `algorithm/<key>` (server-side
  algorithm state: FedAdam's moments, FedEx-LoRA's base updates, FedKDLoRA's teacher) and
  `server/<key>` (the round loop's own: SCAFFOLD's control variate);
- its string metadata holds JSON: `records` (the rounds so far, as in rounds.jsonl) and
  `settings` (the run's settings, its fingerprint: a resume with other settings is refused).

safetensors parses a fixed header and raw tensor bytes, so a crafted file can at worst be
refused; nothing in it is executed (a pickle, as `torch.save` writes, runs whatever its
author put in it when loaded). Every way a file can be wrong gives a `CheckpointError`
naming the file and what to do.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FILENAME = "checkpoint.safetensors"
LEGACY = "checkpoint.pt"  # written by fedtune before checkpoints were safetensors: a pickle, never read
FORMAT = "fedtune-checkpoint/1"
# The keys of a round record a resume reads; every record has them.
RECORD_NUMBERS = ("round", "elapsed", "cum_bytes_up", "cum_bytes_down")

State = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (the message names the file and the fix)."""


class TeacherChanged(CheckpointError):
    """The run distilled from a teacher that is no longer the cached one (it was trained again)."""


@dataclass
class Checkpoint:
    global_state: State
    algorithm_state: State
    records: list[dict]
    settings: dict
    server_state: State = field(default_factory=dict)
    swa_state: State = field(default_factory=dict)  # the running mean of the last rounds (swa-rounds)


def path_in(folder: str | Path) -> Path:
    return Path(folder) / FILENAME


def has_checkpoint(folder: str | Path) -> bool:
    return path_in(folder).is_file()


def save(folder: str | Path, global_state: State, algorithm_state: State, records: list[dict],
         settings: dict, server_state: State | None = None, swa_state: State | None = None) -> None:
    """Write the checkpoint atomically: a reader sees the previous one or the whole new one, and a
    failed write (a full disk) leaves no partial file and raises one clear RuntimeError."""
    folder = Path(folder)
    tensors = {f"global/{k}": v for k, v in global_state.items()}
    tensors |= {f"algorithm/{k}": v for k, v in algorithm_state.items()}
    tensors |= {f"server/{k}": v for k, v in (server_state or {}).items()}
    tensors |= {f"swa/{k}": v for k, v in (swa_state or {}).items()}
    # Own contiguous CPU copies: safetensors refuses tensors that share memory.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "records": json.dumps(records), "settings": json.dumps(settings, sort_keys=True)}
    tmp = folder / (FILENAME + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, folder / FILENAME)
    except (OSError, RuntimeError, SafetensorError) as err:
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(folder).free
        raise RuntimeError(f"could not write the checkpoint in {folder} ({free / 1e6:.0f} MB free on that disk"
                           f"{': it is full' if free < 512e6 else ''}): {err}") from None


def load(folder: str | Path) -> Checkpoint:
    """Read and validate the checkpoint in `folder`; a `CheckpointError` says what is wrong."""
    folder = Path(folder)
    path = folder / FILENAME
    if not path.is_file():
        if (folder / LEGACY).is_file():
            raise CheckpointError(
                f"{folder / LEGACY} is a pickle checkpoint from an older fedtune; it is not read, because loading a "
                f"pickle runs whatever code its author put in it. Start the run again with the settings in "
                f"{folder / 'config.json'}")
        raise CheckpointError(f"{folder} has no {FILENAME}: the run stopped before round 0 finished; start it anew")
    bad = f"{path} is not a fedtune checkpoint"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{bad} (unreadable: {_first_line(err)}); it is damaged: start the run anew") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{bad} (format {metadata.get('format')!r}, expected {FORMAT!r}); start the run anew")
    records = _json(metadata, "records", path)
    settings = _json(metadata, "settings", path)
    problem = _records_problem(records)
    if problem or not isinstance(settings, dict):
        raise CheckpointError(f"{bad} ({problem or 'its settings are not a JSON object'}); start the run anew")
    global_state = {k[len("global/"):]: v for k, v in tensors.items() if k.startswith("global/")}
    algorithm_state = {k[len("algorithm/"):]: v for k, v in tensors.items() if k.startswith("algorithm/")}
    server_state = {k[len("server/"):]: v for k, v in tensors.items() if k.startswith("server/")}
    swa_state = {k[len("swa/"):]: v for k, v in tensors.items() if k.startswith("swa/")}
    if not global_state or len(global_state) + len(algorithm_state) + len(server_state) + len(swa_state) != len(tensors):
        raise CheckpointError(f"{bad} (no global state, or tensors outside global/, algorithm/, server/ and swa/); "
                              f"start the run anew")
    return Checkpoint(global_state, algorithm_state, records, settings, server_state, swa_state)


def check_settings(checkpoint: Checkpoint, settings: dict, path: Path) -> None:
    """Refuse to resume with settings other than the ones the checkpoint was written under (an
    edited config.json would otherwise silently turn the run into another run)."""
    keys = sorted(set(checkpoint.settings) | set(settings) - {"resume"})
    differ = [k for k in keys if k != "resume" and checkpoint.settings.get(k) != settings.get(k)]
    if differ:
        shown = ", ".join(f"{k} (checkpoint {checkpoint.settings.get(k)!r}, now {settings.get(k)!r})"
                          for k in differ[:4])
        raise CheckpointError(f"{path} was written by a run with other settings: {shown}"
                              f"{' and more' if len(differ) > 4 else ''}; a resume continues the same run: undo the "
                              f"change in config.json, or start a new run")


def check_teacher(checkpoint: Checkpoint, teacher_dev: dict[str, float], path: Path) -> None:
    """A run that distils from a pre-trained teacher continues only with the teacher it started
    with: its dev metrics, recorded in round 0, equal those of the teacher cached now. (A teacher
    trained again, e.g. in another precision, under the same folder would otherwise distil into
    rounds that round 0 attributes to the old one.)"""
    if not teacher_dev or not checkpoint.records:
        return
    started = {k: checkpoint.records[0].get(k) for k in teacher_dev}
    if started != teacher_dev:
        key = "teacher_dev_mcc" if "teacher_dev_mcc" in teacher_dev else next(iter(teacher_dev))
        before = started[key] if isinstance(started[key], (int, float)) else float("nan")
        raise TeacherChanged(f"{path}: this run started with another teacher (dev {key[12:]} {before:.4f} in "
                             f"round 0; the cached teacher's is {teacher_dev[key]:.4f}, trained since), so it "
                             f"cannot continue: start the run anew")


def check_state(state: State, expected: State, path: Path) -> None:
    """The checkpoint's global state has exactly the keys, shapes and dtypes of this run's model."""
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise CheckpointError(f"{path} does not hold this run's model (missing {missing[:3]}, unexpected {extra[:3]}); "
                              f"start the run anew")
    for key, value in expected.items():
        if state[key].shape != value.shape or state[key].dtype != value.dtype:
            raise CheckpointError(f"{path} holds {key} as {tuple(state[key].shape)} {state[key].dtype}, this run's model "
                                  f"has {tuple(value.shape)} {value.dtype}; start the run anew")
        if not torch.isfinite(state[key]).all():
            raise CheckpointError(f"{path} holds NaN or Inf in {key}; start the run anew")


def _json(metadata: dict, key: str, path: Path):
    try:
        return json.loads(metadata[key])
    except KeyError:
        raise CheckpointError(f"{path} is not a fedtune checkpoint (no {key!r} in its metadata); start the run anew") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not a fedtune checkpoint ({key} is not JSON: {err}); start the run anew") from None


def _records_problem(records) -> str | None:
    """Why `records` are not the round records a resume can continue from, or None."""
    if not isinstance(records, list) or not records:
        return "no round records"
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            return f"round record {i} is not an object"
        for key in RECORD_NUMBERS:
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                return f"round record {i} has {key}={value!r}, expected a number >= 0"
        if record["round"] != i:
            return f"round record {i} is for round {record['round']}"
    return None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
