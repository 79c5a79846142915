"""`fedtune run`: the Flower app on Flower's simulation engine, in this process."""

from __future__ import annotations

import os
from pathlib import Path

from fedtune.config import Settings


def backend_config() -> dict:
    """One client at a time with every core: on a small CPU machine this trains as fast as
    several single-threaded actors, and a fixed thread count keeps runs reproducible."""
    cpus = os.cpu_count() or 1
    return {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": False}}


def run_federated(settings: Settings, quiet: bool = False) -> Path:
    """Simulate `settings.clients` SuperNodes; returns the finished run folder."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation import run_simulation

    from fedtune.client_app import make_client_app
    from fedtune.preflight import check_federated
    from fedtune.server_app import make_server_app

    check_federated(settings)  # bad input fails here, in seconds, before Ray starts or a folder is made
    outcome: dict = {}
    run_simulation(server_app=make_server_app(settings, quiet, outcome), client_app=make_client_app(settings),
                   num_supernodes=settings.clients, backend_config=backend_config())
    if "run_dir" not in outcome:
        raise RuntimeError("the federated run did not finish; the log above says why")
    return outcome["run_dir"]
