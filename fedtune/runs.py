"""Run folders: written under a temporary name and renamed only when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Any

from fedtune.config import Settings

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked
    fcntl = None

INCOMPLETE = ".incomplete"
LOCK = ".lock"  # in an unfinished run's folder: locked by the process writing it (`lock`)
ACTIVE: list[RunDir] = []  # run folders this process is writing (what Ctrl-C reports)
ELSEWHERE: list[str] = []  # what Ctrl-C reports for runs other processes were writing (`compare --jobs`)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class RunDir:
    """A run's output folder.

    Files go to `<name>.incomplete/`; `finish()` renames it to `<name>/`. A run that
    crashes therefore never leaves a folder that looks finished.
    """

    def __init__(self, out_dir: str | Path, name: str, settings: Settings):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(out_dir) / f"{name}-{stamp}"
        suffix = 1
        while base.exists() or base.with_name(base.name + INCOMPLETE).exists():
            suffix += 1
            base = Path(out_dir) / f"{name}-{stamp}-{suffix}"
        self.final_path = base
        self.path = base.with_name(base.name + INCOMPLETE)
        self.path.mkdir(parents=True)
        lock(self.path)
        write_json(self.path / "config.json", settings.to_dict())
        ACTIVE.append(self)

    @classmethod
    def reopen(cls, folder: str | Path) -> RunDir:
        """An interrupted run's folder (`<name>.incomplete`), to continue writing into."""
        folder = Path(folder)
        if not folder.name.endswith(INCOMPLETE):
            raise ValueError(f"{folder} is not an interrupted run (its name does not end in {INCOMPLETE}); "
                             f"finished runs cannot be resumed")
        if not folder.is_dir():
            raise FileNotFoundError(f"run folder {folder} does not exist")
        lock(folder)
        run = cls.__new__(cls)
        run.path, run.final_path = folder, folder.with_name(folder.name[: -len(INCOMPLETE)])
        ACTIVE.append(run)
        return run

    def release(self) -> None:
        """This process no longer writes the run: out of `ACTIVE`, its folder's lock let go."""
        if self in ACTIVE:
            ACTIVE.remove(self)
        unlock(self.path)

    def write_jsonl(self, filename: str, records: list[dict]) -> None:
        """Replace a JSON-lines file atomically."""
        tmp = self.path / (filename + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.path / filename)

    def append_jsonl(self, filename: str, record: dict) -> None:
        with (self.path / filename).open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_json(self, filename: str, data: Any) -> None:
        write_json(self.path / filename, data)

    def finish(self) -> Path:
        os.replace(self.path, self.final_path)
        (self.final_path / LOCK).unlink(missing_ok=True)  # renamed first: no one resumes a finished run
        unlock(self.path)
        self.path = self.final_path
        if self in ACTIVE:
            ACTIVE.remove(self)
        return self.final_path


def interrupted_message() -> str:
    """What Ctrl-C leaves, in one line: the checkpoint and the command that resumes it, or (no
    round finished yet) that nothing is left: the folder is removed."""
    if not ACTIVE:
        return ELSEWHERE[-1] if ELSEWHERE else "fedtune: interrupted before a run folder was made; nothing to resume"
    run = ACTIVE[-1]
    if not discard_unstarted(run):
        return (f"fedtune: interrupted; the last finished round is checkpointed in {run.path.resolve()}; "
                f"continue with: fedtune resume {run.path.resolve()}")
    return f"fedtune: interrupted with nothing to resume (no round checkpointed); removed {run.path}"


def discard_unstarted(run: RunDir) -> bool:
    """Remove the folder of a run that stopped before its first checkpoint: it holds nothing to
    resume or to read. Returns whether it did (a checkpointed run keeps its folder, for `resume`)."""
    from fedtune.checkpoint import has_checkpoint

    if not run.path.name.endswith(INCOMPLETE) or has_checkpoint(run.path):
        return False
    unlock(run.path)
    shutil.rmtree(run.path, ignore_errors=True)
    if run in ACTIVE:
        ACTIVE.remove(run)
    return True


@contextlib.contextmanager
def discarded_on_error(run: RunDir):
    """A run that fails before its first checkpoint leaves no folder behind (`discard_unstarted`);
    one with a checkpoint keeps it, no longer active. Ctrl-C (a KeyboardInterrupt) is left to
    `interrupted_message`, which reports the run. Either way the folder's lock is let go: nothing
    writes it any more, so `resume` may continue it, from this process (a notebook) or another."""
    try:
        yield run
    except BaseException as err:
        if isinstance(err, Exception) and not discard_unstarted(run) and run in ACTIVE:
            ACTIVE.remove(run)
        unlock(run.path)
        raise


class RunInUse(RuntimeError):
    """An unfinished run folder that another live process is writing."""


_HELD: dict[Path, IO] = {}  # {unfinished run folder: its open, locked lock file} for this process's runs


def lock(folder: Path, wait: float = 1.0) -> None:
    """Lock `folder` (an unfinished run's) for this process while it writes there, so that another
    process that finds the folder (`resume`, a grid looking for its interrupted cell) knows that
    it is in use and neither continues it nor deletes it. An flock on `<folder>/.lock`: the kernel
    lets go when the process ends, however it ends, so a crash or a kill never leaves a stale lock.
    A folder this process holds already stays held; `wait` covers another process's brief probe."""
    folder = Path(folder).resolve()
    if fcntl is None or folder in _HELD:
        return
    file = open(folder / LOCK, "a+")
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            file.seek(0)
            owner = file.read().strip() or "a process"
            file.close()
            raise RunInUse(f"{folder} is being written right now by {owner}; wait for that run to end (or stop "
                           f"it), then resume") from None
    file.seek(0)
    file.truncate()
    file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    file.flush()
    _HELD[folder] = file


def unlock(folder: Path) -> None:
    """Let go of `folder`'s lock, if this process holds it."""
    file = _HELD.pop(Path(folder).resolve(), None)
    if file is not None:
        file.close()


def in_use(folder: Path) -> bool:
    """Whether another process holds `folder`'s lock: it is writing that run now."""
    folder = Path(folder).resolve()
    if fcntl is None or folder in _HELD:
        return False
    try:
        file = open(folder / LOCK)
    except OSError:  # no lock file: never locked (written before locks, or not by fedtune)
        return False
    with file:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
    return False


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_config(path: Path) -> dict:
    """A run folder's config.json as a dict, or one clear error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give the folder of an interrupted fedtune run")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); it is damaged: start the run anew") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object of settings; it is damaged: start the run anew")
    return config
