"""Checks a run makes before it starts anything (Ray, Flower, a run folder): bad input then
fails within seconds with one message naming it, and leaves nothing behind. The checks that need
no library (files, folders) are `fedtune.inputs`, which the CLI runs first."""

from __future__ import annotations

from fedtune.config import Settings
from fedtune.inputs import check_out_dir


def check_data_and_model(settings: Settings) -> None:
    """The GLUE files read; the model (and the student) folder holds a model whose tokenizer loads
    and whose layers have the names `lora-targets` gives."""
    from fedtune.data import cached_task_data
    from fedtune.models import check_lora_targets, load_tokenizer

    for spec in dict.fromkeys(filter(None, (settings.model, settings.student))):
        load_tokenizer(spec)
        if settings.lora_targets:
            check_lora_targets(spec, settings.lora_targets)
    cached_task_data(settings)


def check_federated(settings: Settings):
    """Everything a federated run needs before the simulation starts; returns its Algorithm."""
    from fedtune.algorithms import get_algorithm
    from fedtune.partition import client_partitions

    from fedtune.devices import compute

    check_out_dir(settings.out_dir)
    compute(settings.device, settings.precision, settings.models)  # a device that is not there, fp16 without CUDA
    algorithm = get_algorithm(settings.algorithm, settings)  # combinations of settings it cannot honour
    if settings.resume:
        from fedtune.server_app import resumable_run

        resumable_run(settings)
    check_data_and_model(settings)
    client_partitions(settings, settings.clients)  # clients > rows, an unsatisfiable Dirichlet draw
    return algorithm
