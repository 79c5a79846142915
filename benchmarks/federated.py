"""Federated benchmarks: the cost of a simulated round, 1000 clients, the compare grid."""

from __future__ import annotations

import json
import shutil
import subprocess
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.throughput import build, combined_passes, raw_loop
from fedtune.config import Settings
from fedtune.data import cached_task_data, make_loader, tokenize, train_loader
from fedtune.devices import compute
from fedtune.algorithms import get_algorithm
from fedtune.lockstep import ROOM_ROWS
from fedtune.local import evaluate_state, initial_state, round_seed
from fedtune.models import load_tokenizer
from fedtune.partition import client_partitions
from fedtune.runs import read_jsonl
from fedtune.simulation import run_federated
from fedtune.train import cycle, local_steps as steps_of, supervised_loss


def round_overhead(clients: int = 4, local_steps: int = 10, settings: Settings | None = None) -> dict:
    """Round 2 of a simulated FedLoRA run vs the raw loop over the very same client batches."""
    out = tempfile.mkdtemp(prefix="fedtune-bench-")
    settings = (settings or Settings(task="sst2")).replace(
        algorithm="fedlora", clients=clients, rounds=2, local_steps=local_steps, train_limit=4000, eval_limit=64,
        out_dir=out)
    rounds = read_jsonl(run_federated(settings, quiet=True) / "rounds.jsonl")
    # The same batches, in the same order, through the minimal loop on the same model.
    model, _ = build("lora", settings)  # on settings.device, as the clients were
    precision = compute(settings.device, settings.precision, settings.models)[1]
    tokenizer = load_tokenizer(settings.model)
    private = cached_task_data(settings).private
    partitions = client_partitions(settings, clients)
    raw_seconds = 0.0
    for p in rounds[2]["clients"]:
        loader = make_loader(tokenize(private.select(partitions[p]), tokenizer, settings.max_length), tokenizer,
                             settings.batch_size, shuffle=True, seed=round_seed(settings.seed, 2, p))
        batches = [batch for batch, _ in zip(loader, range(local_steps))]
        raw_seconds += raw_loop(model, supervised_loss, batches, settings.lora_lr, precision)
    start = time.perf_counter()
    algorithm = get_algorithm("fedlora", settings)
    evaluate_state(algorithm, initial_state(algorithm))
    eval_seconds = time.perf_counter() - start
    return {"clients": clients, "local_steps": local_steps, "batch_size": settings.batch_size,
            "samples": rounds[2]["examples_seen"], "round_1_seconds": rounds[1]["seconds"],
            "round_2_seconds": rounds[2]["seconds"], "eval_seconds": eval_seconds, "raw_seconds": raw_seconds,
            "aggregate_seconds": rounds[2]["aggregate_seconds"],
            "ratio": rounds[2]["seconds"] / raw_seconds,
            "ratio_without_eval": (rounds[2]["seconds"] - eval_seconds) / raw_seconds}


def clients_per_round(sizes: tuple[int, ...] = (1, 4, 16, 64), local_steps: int = 5, timed_rounds: int = 3,
                      settings: Settings | None = None, batching: str = "by-length", pairs: int = 3) -> dict:
    """Samples/s of a FedLoRA round at `sizes` clients per round, one client at a time vs batched
    (`batched-clients`, the clients training in lockstep over the shared base), on the local engine
    with model-dropout 0 (batching is exact only without dropout): the median of `timed_rounds`
    rounds after the first (which loads the model and tokenizes each client's rows), the server's
    evaluation taken out. Runs one at a time and batched alternate, `pairs` pairs (one pair past 16
    clients), so that a host whose speed drifts does not favour either; the speed-up is the median
    of the pairs'. Also the raw loops of `batch_ceiling` on the same clients' batches."""
    settings = (settings or Settings(task="sst2")).replace(
        algorithm="fedlora", rounds=1 + timed_rounds, local_steps=local_steps, eval_limit=32, model_dropout=0.0,
        engine="local", batching=batching, out_dir=tempfile.mkdtemp(prefix="fedtune-bench-"))
    rows = []
    for clients in sizes:
        run = settings.replace(clients=clients, train_limit=clients * local_steps * settings.batch_size * 2)
        speeds = {"off": [], "on": []}
        for _ in range(pairs if clients <= 16 else 1):
            for mode in speeds:
                timed = read_jsonl(run_federated(run.replace(batched_clients=mode), quiet=True) / "rounds.jsonl")[2:]
                speeds[mode].append(statistics.median(r["examples_seen"] / (r["seconds"] - r["eval_seconds"])
                                                      for r in timed))
        row = {"clients": clients, "off_samples_per_s": statistics.median(speeds["off"]),
               "on_samples_per_s": statistics.median(speeds["on"]),
               "speedup": statistics.median(on / off for off, on in zip(speeds["off"], speeds["on"])),
               "speedups": [on / off for off, on in zip(speeds["off"], speeds["on"])]}
        row.update(batch_ceiling(run, min(clients, ROOM_ROWS // settings.batch_size)))
        rows.append(row)
        print(row, flush=True)
    return {"local_steps": local_steps, "timed_rounds": timed_rounds, "batch_size": settings.batch_size,
            "batching": batching, "precision": compute(settings.device, settings.precision, settings.models)[1],
            "pairs": pairs, "rows": rows}


def client_batches(settings: Settings, server_round: int) -> list[list[dict]]:
    """Each client's batches of `server_round` (a full-participation run of `settings`), as its
    local training draws them (`data.train_loader`, the round's seed)."""
    tokenizer = load_tokenizer(settings.input_model)
    private = cached_task_data(settings).private
    out = []
    for p, rows in enumerate(client_partitions(settings, settings.clients)):
        loader = train_loader(private.select(rows), tokenizer, settings, round_seed(settings.seed, server_round, p))
        out.append([batch for batch, _ in zip(cycle(loader), range(steps_of(settings, len(rows))))])
    return out


def batch_ceiling(settings: Settings, room: int, repeats: int = 3) -> dict:
    """What the combined steps of batched clients buy in the model's own work: one model's raw loop
    over round 2's client batches one client after another, against the same loop over the same
    rows cut into the passes combined steps of `room` clients run (`throughput.combined_passes`:
    each step's rows sorted by length, in passes of at most `lockstep.CHUNK_TOKENS` tokens: larger
    matmuls, and less padding than each client's own batches); the median of `repeats` alternations.
    Returns both loops' samples/s and their ratio (`ceiling`); batched clients add to the second
    loop's work each client's own adapters, loss and optimizer step."""
    precision = compute(settings.device, settings.precision, settings.models)[1]
    per_client = client_batches(settings, 2)
    own = [batch for batches in per_client for batch in batches]
    steps = max(len(b) for b in per_client)
    grouped = []
    for start in range(0, len(per_client), room):
        members = per_client[start:start + room]
        for step in range(steps):  # a client that has taken its steps leaves the room
            grouped += combined_passes([b[step] for b in members if step < len(b)])
    samples = sum(len(b["labels"]) for b in own)
    speeds = []
    for _ in range(repeats):
        for each in (own, grouped):
            model, _ = build("lora", settings)
            raw_loop(model, supervised_loss, own[:2], settings.lora_lr, precision)  # warm-up
            speeds.append(samples / raw_loop(model, supervised_loss, each, settings.lora_lr, precision))
    return {"raw_samples_per_s": statistics.median(speeds[0::2]),
            "raw_grouped_samples_per_s": statistics.median(speeds[1::2]),
            "ceiling": statistics.median(b / a for a, b in zip(speeds[0::2], speeds[1::2]))}


class MemoryWatch:
    """Peak memory of this process and all its children (Ray workers), sampled every `interval` s.

    `rss` sums resident sets (shared pages counted once per process: an upper bound);
    `pss` shares each shared page among the processes that map it (closer to the truth).
    """

    def __init__(self, interval: float = 1.0):
        self.interval, self.peak_rss, self.peak_pss = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    info = process.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss, pss = rss + info.rss, pss + info.pss
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def many_clients(clients: int = 1000, fraction: float = 0.05, rounds: int = 3, local_steps: int = 2,
                 settings: Settings | None = None, engine: str = "ray") -> dict:
    """FlexLoRA with `clients` simulated SuperNodes on all of SST-2, `fraction` of them per round.

    Per-client overhead: a round's wall time minus what the clients' training loops took (summed:
    clients train one at a time), aggregation, server-side work and evaluation, per sampled client.
    """
    out = tempfile.mkdtemp(prefix="fedtune-bench-")
    settings = (settings or Settings(task="sst2")).replace(
        algorithm="flexlora", clients=clients, fraction_train=fraction, rounds=rounds, local_steps=local_steps,
        batch_size=16, eval_limit=256, out_dir=out, engine=engine)
    start = time.perf_counter()
    with MemoryWatch() as memory:
        path = run_federated(settings, quiet=True)
    total = time.perf_counter() - start
    records = read_jsonl(path / "rounds.jsonl")
    summary = json.loads((path / "summary.json").read_text())
    overhead = [(r["seconds"] - r["client_train_seconds"] - r["aggregate_seconds"] - r["server_seconds"]
                 - r["eval_seconds"]) / len(r["clients"]) for r in records[1:]]
    return {"engine": engine, "clients": clients, "per_round": len(records[1]["clients"]), "rounds": rounds,
            "local_steps": local_steps, "batch_size": settings.batch_size,
            "seconds_per_round": [r["seconds"] for r in records[1:]],
            "client_train_seconds": [r["client_train_seconds"] for r in records[1:]],
            "eval_seconds": [r["eval_seconds"] for r in records[1:]],
            "aggregate_seconds": [r["aggregate_seconds"] for r in records[1:]],
            "overhead_per_client": overhead, "setup_seconds": total - records[-1]["elapsed"],
            "total_seconds": total, "peak_rss_gb": memory.peak_rss / 1e9, "peak_pss_gb": memory.peak_pss / 1e9,
            "dev_accuracy": summary["dev"]["accuracy"],
            "mb_up_per_round": sum(r["bytes_up"] for r in records[1:]) / rounds / 1e6}


def compare_grid(task: str = "sst2", seeds: int = 1, options: tuple[str, ...] = ()) -> dict:
    """`fedtune compare` (the small preset unless `options` name another) from an empty cache, timed
    end to end, with each cell's own wall time."""
    out = tempfile.mkdtemp(prefix="fedtune-bench-")
    command = [sys.executable, "-m", "fedtune.cli", "compare", "--quiet", *options, "--task", task,
               "--partition", "iid", "--seeds", str(seeds), "--out-dir", out]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    results = json.loads(next(Path(out).glob("compare/*/results.json")).read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"task": task, "seeds": seeds, "cells": len(results["cells"]), "seconds": seconds,
            "cell_seconds": {c["label"]: c["wall_seconds"] for c in results["cells"]},
            # what each cell reached (a speed-up must not change it beyond the seeds' spread)
            "cell_metric": {c["label"]: c["summary"]["dev"].get("mcc", c["summary"]["dev"]["accuracy"])
                            for c in results["cells"]},
            "command": " ".join(["fedtune", "compare", *command[5:-2]])}


def standard_grid() -> dict:
    """The `standard` SST-2 IID grid, one seed, every row, as a user of a 2-core machine runs it
    (local engine, two cells at a time), timed from an empty cache (issue #26: <= 40 min)."""
    return compare_grid(options=("--preset", "standard", "--engine", "local", "--jobs", "2"))
