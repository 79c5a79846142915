"""`fedtune run`: the Flower app on Flower's simulation engine, in this process."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

from fedtune.config import Settings


def backend_config(settings: Settings | None = None) -> dict:
    """Ray resources per simulated client. By default one client at a time with every core: on a
    small CPU machine this trains as fast as several single-threaded actors, and a fixed thread
    count keeps runs reproducible. Computing on CUDA, each client reserves `client-gpus` of a GPU
    (default a whole one; 0.25 lets 4 clients share it, each with `client-cpus` cores)."""
    settings = settings or Settings()
    cpus = os.cpu_count() or 1
    gpus = settings.client_gpus
    if gpus == 0:
        from fedtune.devices import compute

        gpus = 1.0 if compute(settings.device, settings.precision, settings.models)[0].type == "cuda" else 0.0
    return {"client_resources": {"num_cpus": min(settings.client_cpus or cpus, cpus), "num_gpus": gpus},
            "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": False}}


@contextlib.contextmanager
def stop_on_interrupt():
    """While the simulation runs, Ctrl-C (SIGINT) stops every process it started (Ray's too),
    prints one line (`runs.interrupted_message`) and exits with 130, without the tracebacks of
    Flower's threads and Ray's actors, and without waiting for them. The checkpoint written after
    each round is complete (it is replaced atomically), so `fedtune resume` continues from it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach only the main thread
        return

    def stop(signum, frame):
        import psutil

        from fedtune.runs import interrupted_message

        quiet = os.open(os.devnull, os.O_WRONLY)
        terminal = os.dup(2)
        os.dup2(quiet, 2)  # what dying threads and actors would print
        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(children, timeout=5)
        os.write(terminal, (interrupted_message() + "\n").encode())
        os._exit(130)

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_federated(settings: Settings, quiet: bool = False) -> Path:
    """Simulate `settings.clients` SuperNodes; returns the finished run folder."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from fedtune.client_app import make_client_app
    from fedtune.preflight import check_federated
    from fedtune.server_app import make_server_app

    check_federated(settings)  # bad input fails here, in seconds, before Ray starts or a folder is made
    if settings.engine == "local":
        from fedtune.inprocess import run_local

        with stop_on_interrupt():
            return run_local(settings, make_client_app(settings), quiet)
    from flwr.simulation import run_simulation  # Flower's simulation engine and Ray: only for this engine

    outcome: dict = {}
    with stop_on_interrupt():
        run_simulation(server_app=make_server_app(settings, quiet, outcome), client_app=make_client_app(settings),
                       num_supernodes=settings.clients, backend_config=backend_config(settings))
    if "error" in outcome:
        raise outcome["error"]
    if "run_dir" not in outcome:
        raise RuntimeError("the federated run did not finish; the log above says why")
    return outcome["run_dir"]
