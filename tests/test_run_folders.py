"""An unfinished run folder belongs to the process writing it: no other process continues it or
deletes it, and a grid's cell processes do not outlive the grid that started them."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.config import Settings
from fedtune.runs import RunDir, RunInUse, in_use, unlock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="run folders are locked with flock (POSIX)")

# A process that starts a run (as a server or a grid cell does), says where, and holds it until its stdin closes.
WRITER = """
import sys
from fedtune.config import Settings
from fedtune.runs import RunDir
settings = Settings(algorithm="fedlora", task="cola", out_dir=sys.argv[1])
run = RunDir(settings.out_dir, "fedlora-cola", settings)
print(run.path, flush=True)
sys.stdin.read()
"""


def _start(script: str, *args: str) -> tuple[subprocess.Popen, Path]:
    process = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    return process, Path(process.stdout.readline().strip())


def test_a_run_another_live_process_writes_is_neither_resumed_nor_removed(tmp_path):
    from fedtune.grid import interrupted_run

    writer, folder = _start(WRITER, str(tmp_path))
    try:
        assert folder.name.endswith(".incomplete") and folder.is_dir()
        assert in_use(folder)
        with pytest.raises(RunInUse, match=rf"is being written right now by pid {writer.pid} on "):
            RunDir.reopen(folder)
        # The grid neither continues the cell nor deletes its folder (no checkpoint yet: a dead
        # process's folder would be removed): it starts the cell anew beside it.
        settings = Settings(algorithm="fedlora", task="cola", out_dir=str(tmp_path))
        assert interrupted_run(settings) is None and folder.is_dir()
    finally:
        writer.stdin.close()
        writer.wait(timeout=30)
    # The kernel dropped the lock with the process, which never finished: the folder is free.
    assert not in_use(folder)
    run = RunDir.reopen(folder)
    assert not in_use(run.path)  # held by this process now, which may reopen it again
    assert RunDir.reopen(folder).path == folder
    unlock(folder)
    # A dead run without a checkpoint is what the grid cleans up.
    assert interrupted_run(Settings(algorithm="fedlora", task="cola", out_dir=str(tmp_path))) is None
    assert not folder.exists()


def test_a_finished_run_keeps_no_lock_file(tmp_path):
    settings = Settings(algorithm="fedlora", task="cola", out_dir=str(tmp_path))
    run = RunDir(settings.out_dir, "fedlora-cola", settings)
    assert (run.path / ".lock").is_file()
    final = run.finish()
    assert sorted(p.name for p in final.iterdir()) == ["config.json"]


# A grid's cell process: starts a run (no round checkpointed yet) and watches its parent, as
# `grid._worker` does; its parent is the process that starts it here.
CELL = """
import os, sys, time
from fedtune.config import Settings
from fedtune.grid import _end_with_parent
from fedtune.runs import RunDir
settings = Settings(algorithm="fedlora", task="cola", out_dir=sys.argv[1])
run = RunDir(settings.out_dir, "fedlora-cola", settings)
print(run.path, flush=True)
_end_with_parent(os.getppid(), every=0.05)
"""
# The grid: starts the cell process, passes on where its run is, and is killed (no Ctrl-C).
GRID = """
import os, subprocess, sys
cell = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
print(cell.stdout.readline().strip(), cell.pid, flush=True)
sys.stdin.read()
os._exit(9)
"""


def test_a_cell_process_ends_when_its_grid_is_killed(tmp_path):
    grid = subprocess.Popen([sys.executable, "-c", GRID, CELL, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    path, pid = grid.stdout.readline().split()
    folder = Path(path)
    time.sleep(0.5)
    assert folder.is_dir() and in_use(folder)  # the cell runs on while its grid lives
    grid.stdin.close()
    assert grid.wait(timeout=30) == 9
    deadline = time.monotonic() + 30
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # The orphaned cell noticed within its polling period, removed its unstarted run and exited.
    assert not folder.exists()
    status = Path(f"/proc/{pid}/status")
    while status.exists() and "State:\tZ" not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)  # gone, or a zombie that no init reaps in this container: exited either way
    assert not status.exists() or "State:\tZ" in status.read_text()


def test_a_run_stopped_inside_a_live_process_is_free_for_another_to_resume(tmp_path):
    """Ctrl-C in a notebook, or an error after a checkpoint: the process lives on but no longer
    writes the run, so another process may take it up."""
    from fedtune.runs import ACTIVE, discarded_on_error

    settings = Settings(algorithm="fedlora", task="cola", out_dir=str(tmp_path))
    run = RunDir(settings.out_dir, "fedlora-cola", settings)
    reopen = f"import sys; from fedtune.runs import RunDir; RunDir.reopen({str(run.path)!r})"
    held = subprocess.run([sys.executable, "-c", reopen], capture_output=True, text=True)
    assert held.returncode == 1 and "RunInUse" in held.stderr and "is being written right now" in held.stderr
    with pytest.raises(KeyboardInterrupt), discarded_on_error(run):
        raise KeyboardInterrupt
    assert run in ACTIVE and run.path.is_dir()  # Ctrl-C's message still names it
    done = subprocess.run([sys.executable, "-c", reopen], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    run.release()
