"""Ctrl-C during a simulation: one line naming the checkpoint and the resume command, every child
process stopped, exit 130, no traceback; the run then resumes to the end."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.slow  # the full tier (FULL=1 bash scripts/test.sh)


def test_sigint_to_a_running_simulation_stops_everything_and_says_how_to_resume(tiny_bert, glue_dir, tmp_path):
    out = tmp_path / "runs"
    args = ["run", "--task", "cola", "--glue-dir", str(glue_dir), "--model", tiny_bert, "--clients", "2",
            "--rounds", "30", "--train-limit", "40", "--eval-limit", "16", "--batch-size", "8", "--max-length", "32",
            "--local-steps", "2", "--lora-r", "2", "--out-dir", str(out), "--quiet"]
    command = [sys.executable, "-c", "import sys; from fedtune.cli import main; sys.exit(main(sys.argv[1:]))", *args]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)  # its own process group, as a terminal's job
    deadline = time.monotonic() + 240
    rounds = None
    while time.monotonic() < deadline and process.poll() is None:
        found = list(out.glob("*.incomplete/rounds.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 2:  # round 1 is checkpointed
            rounds = found[0]
            break
        time.sleep(0.5)
    assert rounds is not None, process.communicate()[1][-2000:]
    children = psutil.Process(process.pid).children(recursive=True)
    assert children  # Ray's processes
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    start = time.monotonic()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert time.monotonic() - start < 30
    assert "Traceback" not in err and "Error" not in err, err[-2000:]
    folder = rounds.parent.resolve()
    assert err.strip().splitlines()[-1].endswith(f"continue with: fedtune resume {folder}")
    assert (folder / "checkpoint.safetensors").is_file() and not list(folder.glob("*.tmp"))
    time.sleep(1)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    config = json.loads((folder / "config.json").read_text())
    assert config["rounds"] == 30
