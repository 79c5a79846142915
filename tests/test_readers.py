"""Every file fedtune reads back, damaged: the command that reads it exits with 2 and one line on
stderr naming the file, never a traceback, and a pickle in it never runs."""

import json
import os
import pickle
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # fresh `fedtune` processes


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


# Every case runs in one fresh process per test group (not one per case: a process start costs
# seconds): `main` called per case with file descriptor 2 redirected, so whatever reaches stderr by
# any route (print, logging, warnings) is what the case's stderr holds.
RUNNER = r"""
import contextlib, io, json, os, sys, tempfile, traceback
from pathlib import Path
from fedtune.cli import main
cases, out = json.loads(Path(sys.argv[1]).read_text()), {}
for case in cases:
    os.chdir(case["cwd"])
    with tempfile.TemporaryFile("w+") as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                if "args" in case:
                    code = main(case["args"])
                else:  # a cached grid cell, read back by the grid
                    from fedtune.config import Settings
                    from fedtune.grid import Cell, run_cell
                    run_cell(Cell("LoRA", Settings(task="cola", out_dir=case["cwd"], method="lora"), True),
                             Path(case["cells"]), True)
                    code = 0
        except SystemExit as error:
            code = error.code
        except BaseException:
            traceback.print_exc()
            code = "exception"
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        out[case["id"]] = {"code": code, "stderr": err.read()}
Path(sys.argv[2]).write_text(json.dumps(out))
"""


def run_cases(cases: list[dict], folder) -> dict[str, dict]:
    """{case id: {"code": exit code, "stderr": text}}, all cases in one `fedtune` process."""
    (folder / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, "-c", RUNNER, str(folder / "cases.json"), str(folder / "out.json")], check=True,
                   timeout=600, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"})
    return json.loads((folder / "out.json").read_text())


class Done:
    def __init__(self, outcome):
        self.returncode, self.stderr = outcome["code"], outcome["stderr"]


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


EXPORT_FILES = ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
EXPORT_DAMAGES = ["truncated", "empty", "random bytes", "json null", "pickle"]
CONFIG_DAMAGES = ["truncated", "empty", "random bytes", "json null", "json string", "pickle"]
GLUE_DAMAGES = ["truncated", "empty", "random bytes", "header only", "bad label", "pickle"]
CELL_DAMAGES = ["truncated", "empty", "random bytes", "json null", "json with nulls", "pickle"]


@pytest.fixture(scope="module")
def exports_read(export, tmp_path_factory):
    """`fedtune evaluate` on copies of the export, each with one file damaged (config.json: the
    run's config beside the model)."""
    import shutil

    cases, paths = [], {}
    for name in [*EXPORT_FILES, "config.json"]:
        for damage in CONFIG_DAMAGES if name == "config.json" else EXPORT_DAMAGES:
            folder = tmp_path_factory.mktemp("damaged")
            run = folder / "run"
            shutil.copytree(export, run)
            path = run / name if name == "config.json" else run / "model" / name
            path.write_bytes(mutations(path.read_bytes(), folder / "PWNED")[damage])
            case = f"{name}/{damage}"
            cases.append({"id": case, "cwd": str(folder), "args": ["evaluate", str(run / "model")]})
            paths[case] = (folder, run)
    return run_cases(cases, tmp_path_factory.mktemp("exports-read")), paths


@pytest.mark.parametrize("name", EXPORT_FILES)
@pytest.mark.parametrize("damage", EXPORT_DAMAGES)
def test_a_damaged_export_gets_one_error(exports_read, name, damage):
    outcomes, paths = exports_read
    folder, run = paths[f"{name}/{damage}"]
    assert_one_clear_error(Done(outcomes[f"{name}/{damage}"]), run / "model")
    assert not (folder / "PWNED").exists()


@pytest.mark.parametrize("damage", CONFIG_DAMAGES)
def test_a_damaged_run_config_gets_one_error(exports_read, damage):
    outcomes, paths = exports_read
    folder, run = paths[f"config.json/{damage}"]
    assert_one_clear_error(Done(outcomes[f"config.json/{damage}"]), run / "config.json")
    assert not (folder / "PWNED").exists()


@pytest.fixture(scope="module")
def glue_read(glue_dir, tiny_bert, tmp_path_factory):
    """`fedtune centralized` on copies of SST-2 whose train.tsv is damaged."""
    import shutil

    cases, folders = [], {}
    for damage in GLUE_DAMAGES:
        folder = tmp_path_factory.mktemp("glue")
        glue = folder / "glue"
        shutil.copytree(glue_dir / "SST-2", glue / "SST-2")
        path = glue / "SST-2" / "train.tsv"
        original = path.read_bytes()[:20_000]
        data = {**mutations(original, folder / "PWNED"), "header only": b"sentence\tlabel\n",
                "bad label": b"sentence\tlabel\nfine film\t7\n"}[damage]
        path.write_bytes(data)
        cases.append({"id": damage, "cwd": str(folder),
                      "args": ["centralized", "--task", "sst2", "--glue-dir", str(glue), "--model", tiny_bert,
                               "--train-limit", "16", "--out-dir", str(folder / "runs"), "--quiet"]})
        folders[damage] = folder
    return run_cases(cases, tmp_path_factory.mktemp("glue-read")), folders


@pytest.mark.parametrize("damage", GLUE_DAMAGES)
def test_a_damaged_glue_file_gets_one_error(glue_read, damage):
    outcomes, folders = glue_read
    folder, done = folders[damage], Done(outcomes[damage])
    if damage in ("truncated",) and done.returncode == 0:
        return  # half a TSV cut at a line end is still a valid (shorter) TSV
    assert_one_clear_error(done, folder / "glue" / "SST-2" / "train.tsv")
    assert not (folder / "PWNED").exists() and not list((folder / "runs").glob("*"))  # nothing half-written


@pytest.fixture(scope="module")
def cells_read(tmp_path_factory):
    """The grid reading back cached cells that are damaged."""
    from fedtune.config import Settings
    from fedtune.grid import Cell

    cases, paths = [], {}
    for damage in CELL_DAMAGES:
        folder = tmp_path_factory.mktemp("cell")
        cell = Cell("LoRA", Settings(task="cola", out_dir=str(folder), method="lora"), centralized=True)
        cells = folder / "cells"
        cells.mkdir()
        path = cells / f"{cell.key}.json"
        good = json.dumps({"label": "LoRA", "settings": {}, "rounds": [], "summary": {"dev": {"mcc": 0.1}},
                           "wall_seconds": 1.0}).encode()
        path.write_bytes(mutations(good, folder / "PWNED")[damage])
        cases.append({"id": damage, "cwd": str(folder), "cells": str(cells)})
        paths[damage] = (folder, path)
    return run_cases(cases, tmp_path_factory.mktemp("cells-read")), paths


@pytest.mark.parametrize("damage", CELL_DAMAGES)
def test_a_damaged_cached_cell_gets_one_error(cells_read, damage):
    outcomes, paths = cells_read
    folder, path = paths[damage]
    done = Done(outcomes[damage])
    assert done.returncode != 0 and f"cached cell {path} is damaged" in done.stderr
    assert not (folder / "PWNED").exists()
