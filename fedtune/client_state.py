"""What a client keeps between rounds (FedKDLoRA's teacher), on the client's own disk.

Files are `<out-dir>/client-state/<run name>/client-<partition>-round-<r>.safetensors`:
one per round, so a resumed server finds the state each client had after the last
checkpointed round, and only the two newest are kept. Nothing here is ever sent.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedtune.algorithms.aggregate import State


def state_folder(out_dir: str, run_name: str) -> Path:
    if not run_name or "/" in run_name or run_name.startswith("."):
        raise ValueError(f"bad run name {run_name!r} for client state")
    return Path(out_dir) / "client-state" / run_name


def _rounds(folder: Path, partition_id: int) -> dict[int, Path]:
    pattern = re.compile(rf"client-{partition_id}-round-(\d+)\.safetensors")
    found = {}
    for path in folder.glob(f"client-{partition_id}-round-*.safetensors") if folder.is_dir() else []:
        if match := pattern.fullmatch(path.name):
            found[int(match.group(1))] = path
    return found


def load_kept(folder: Path, partition_id: int, server_round: int) -> State | None:
    """The state this client saved in its latest round before `server_round`, or None."""
    earlier = {r: p for r, p in _rounds(folder, partition_id).items() if r < server_round}
    return load_file(earlier[max(earlier)]) if earlier else None


def save_kept(folder: Path, partition_id: int, server_round: int, state: State) -> None:
    """Save atomically; then drop this client's files older than the previous round."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"client-{partition_id}-round-{server_round}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
    for r, old in _rounds(folder, partition_id).items():
        if r < server_round - 1:
            old.unlink(missing_ok=True)
