"""The first checks of a run's input, with the standard library alone: the CLI runs them before
torch, transformers or Flower are imported, so a missing file or an unwritable folder is reported
at once, with one message naming it. `fedtune.preflight` follows with the checks that need those
libraries."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fedtune.config import Settings
from fedtune.tasks import task_spec

from fedtune.bundled import bundled_name


def check_inputs(settings: Settings) -> None:
    """The files a run reads and the folder it writes: GLUE files, a local model folder, the run
    folder to resume, `out-dir`. Standard library only."""
    check_out_dir(settings.out_dir)
    check_glue_files(settings)
    check_model_folder(settings.model)
    if settings.student:
        check_model_folder(settings.student)
    if settings.resume:
        check_resume_folder(settings.resume)


def check_glue_files(settings: Settings) -> None:
    """With a GLUE folder (`glue-dir` or GLUE_DIR), both files of the task are there (their
    content is read, and checked, when the data loads)."""
    glue_dir = settings.resolved_glue_dir
    if not glue_dir:
        return  # the HF hub: checked when the data loads
    spec = task_spec(settings.task)
    for name in ("train.tsv", "dev.tsv"):
        path = Path(glue_dir).expanduser() / spec.folder / name
        if not path.is_file():
            raise FileNotFoundError(f"GLUE file not found: {path}. Point --glue-dir (or GLUE_DIR) at a folder in GLUE "
                                    f"layout containing {spec.folder}/train.tsv and {spec.folder}/dev.tsv.")
        if not os.access(path, os.R_OK):
            raise ValueError(f"GLUE file {path} is not readable")


def model_folder_problem(spec: str) -> str | None:
    """Why `spec` (a model setting) names no usable local model, or None (a usable folder, the
    bundled model, or a hub id)."""
    if bundled_name(spec):
        return None
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            return (f"model folder {folder} holds no Hugging Face model (no config.json): give 'minilm', "
                    f"a hub id, or a folder written by save_pretrained")
        return None
    if folder.exists() or spec.startswith((".", "/", "~")):
        return (f"model {spec!r} is not a folder with a Hugging Face model "
                f"(give 'minilm', a hub id such as 'distilbert-base-uncased', or a local folder)")
    return None


def check_model_folder(spec: str) -> None:
    if problem := model_folder_problem(spec):
        raise ValueError(problem)


def check_resume_folder(folder: str) -> None:
    """An interrupted run's folder with its config.json and a checkpoint (read and validated later)."""
    path = Path(folder)
    if not path.name.endswith(".incomplete"):
        raise ValueError(f"{path} is not an interrupted run (its name does not end in .incomplete); "
                         f"finished runs cannot be resumed")
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} does not exist")


def check_out_dir(out_dir: str) -> None:
    """The output folder is a folder this process can write in, or one it can make: it is not made
    here (a run that stops at a later check leaves nothing behind); the run makes it when it writes."""
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out-dir {path} is a file, not a folder: give a folder for the run folders")
    existing = next(p for p in (path, *path.parents) if p.exists())  # the root always exists
    if not existing.is_dir():
        raise ValueError(f"--out-dir {path} cannot be created ({existing} is a file): give a writable folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".fedtune-write-test-"):
            pass
    except OSError as err:
        where = "" if existing == path else f" (its folder {existing} is not writable)"
        raise ValueError(f"--out-dir {path} is not writable{where}: {err.strerror}; give a writable folder") from None
