"""Every file fedtune reads back, damaged: the command that reads it exits with 2 and one line on
stderr naming the file, never a traceback, and a pickle in it never runs."""

import json
import os
import pickle
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each case is a fresh `fedtune` process


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def mutations(original: bytes, marker) -> dict[str, bytes]:
    """Ways a file goes wrong: cut short, emptied, noise, JSON of the wrong shape, a pickle."""
    return {"truncated": original[: len(original) // 2], "empty": b"", "random bytes": os.urandom(2048),
            "json null": b"null", "json string": b'"text"', "json with nulls": json.dumps({"dev": None}).encode(),
            "pickle": pickle.dumps({"records": _RunsCode(marker)})}


def fedtune(*args, cwd):
    code = "import sys; from fedtune.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"})


def assert_one_clear_error(done, path):
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-2000:]
    assert str(path) in lines[0], lines[0]


@pytest.fixture(scope="module")
def export(tiny_bert, glue_dir, tmp_path_factory):
    """A finished tiny centralized LoRA run (its model/ is an adapter; config.json beside it)."""
    from fedtune.centralized import run_centralized
    from fedtune.config import Settings

    settings = Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, train_limit=16, eval_limit=16,
                        batch_size=8, max_length=32, epochs=1, lora_r=2, method="lora",
                        out_dir=str(tmp_path_factory.mktemp("runs")))
    return run_centralized(settings, quiet=True)


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"])
@pytest.mark.parametrize("damage", ["truncated", "empty", "random bytes", "json null", "pickle"])
def test_a_damaged_export_gets_one_error(export, tmp_path, name, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(export, run)
    path = run / "model" / name
    marker = tmp_path / "PWNED"
    path.write_bytes(mutations(path.read_bytes(), marker)[damage])
    done = fedtune("evaluate", str(run / "model"), cwd=tmp_path)
    assert_one_clear_error(done, run / "model")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "random bytes", "json null", "json string", "pickle"])
def test_a_damaged_run_config_gets_one_error(export, tmp_path, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(export, run)
    path = run / "config.json"
    marker = tmp_path / "PWNED"
    path.write_bytes(mutations(path.read_bytes(), marker)[damage])
    done = fedtune("evaluate", str(run / "model"), cwd=tmp_path)
    assert_one_clear_error(done, path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "random bytes", "header only", "bad label", "pickle"])
def test_a_damaged_glue_file_gets_one_error(glue_dir, tiny_bert, tmp_path, damage):
    import shutil

    glue = tmp_path / "glue"
    shutil.copytree(glue_dir / "SST-2", glue / "SST-2")
    path = glue / "SST-2" / "train.tsv"
    marker = tmp_path / "PWNED"
    original = path.read_bytes()[:20_000]
    data = {**mutations(original, marker), "header only": b"sentence\tlabel\n",
            "bad label": b"sentence\tlabel\nfine film\t7\n"}[damage]
    path.write_bytes(data)
    done = fedtune("centralized", "--task", "sst2", "--glue-dir", str(glue), "--model", tiny_bert, "--train-limit",
                   "16", "--out-dir", str(tmp_path / "runs"), "--quiet", cwd=tmp_path)
    if damage in ("truncated",) and done.returncode == 0:
        return  # half a TSV cut at a line end is still a valid (shorter) TSV
    assert_one_clear_error(done, path)
    assert not marker.exists() and not list((tmp_path / "runs").glob("*"))  # nothing half-written


@pytest.mark.parametrize("damage", ["truncated", "empty", "random bytes", "json null", "json with nulls", "pickle"])
def test_a_damaged_cached_cell_gets_one_error(tmp_path, damage):
    from fedtune.config import Settings
    from fedtune.grid import Cell

    settings = Settings(task="cola", out_dir=str(tmp_path))
    cell = Cell("LoRA", settings.replace(method="lora"), centralized=True)
    cells = tmp_path / "cells"
    cells.mkdir()
    path = cells / f"{cell.key}.json"
    marker = tmp_path / "PWNED"
    good = json.dumps({"label": "LoRA", "settings": {}, "rounds": [], "summary": {"dev": {"mcc": 0.1}},
                       "wall_seconds": 1.0}).encode()
    path.write_bytes(mutations(good, marker)[damage])
    code = ("import sys; from pathlib import Path; from fedtune.grid import Cell, run_cell; from fedtune.config import "
            f"Settings; s = Settings(task='cola', out_dir={str(tmp_path)!r}, method='lora'); "
            f"run_cell(Cell('LoRA', s, True), Path({str(cells)!r}), True)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and f"cached cell {path} is damaged" in done.stderr
    assert not marker.exists()
