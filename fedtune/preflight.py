"""Checks a run makes before it starts anything (Ray, Flower, a run folder): bad input then
fails within seconds with one message naming it, and leaves nothing behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fedtune.config import Settings


def check_out_dir(out_dir: str) -> None:
    """The output folder is a folder (made if missing) that this process can write in."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"--out-dir {path} is a file, not a folder: give a folder for the run folders") from None
    except OSError as err:
        raise ValueError(f"--out-dir {path} cannot be created ({err.strerror}): give a writable folder") from None
    if not path.is_dir():
        raise ValueError(f"--out-dir {path} is not a folder: give a folder for the run folders")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".fedtune-write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"--out-dir {path} is not writable ({err.strerror}): give a writable folder") from None


def check_data_and_model(settings: Settings) -> None:
    """The GLUE files read, the model folder holds a model, the tokenizer loads."""
    from fedtune.data import cached_task_data
    from fedtune.models import load_tokenizer

    load_tokenizer(settings.model)
    cached_task_data(settings)


def check_federated(settings: Settings):
    """Everything a federated run needs before the simulation starts; returns its Algorithm."""
    from fedtune.algorithms import get_algorithm
    from fedtune.partition import client_partitions

    from fedtune.devices import compute

    check_out_dir(settings.out_dir)
    compute(settings.device, settings.precision)  # a device that is not there, fp16 without CUDA
    algorithm = get_algorithm(settings.algorithm, settings)  # combinations of settings it cannot honour
    if settings.resume:
        from fedtune.server_app import resumable_run

        resumable_run(settings)
    check_data_and_model(settings)
    client_partitions(settings, settings.clients)  # clients > rows, an unsatisfiable Dirichlet draw
    return algorithm
