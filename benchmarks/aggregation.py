"""Server aggregation time vs number of clients and LoRA rank, for every algorithm.

Client states have the exact names and shapes each algorithm sends for the default model
(all-MiniLM-L6-v2, LoRA on query/value), filled with random values; weights are random
example counts. Time is the best of a few calls of `algorithm.aggregate`.
"""

from __future__ import annotations

import time

import torch

from fedtune.algorithms import get_algorithm
from fedtune.config import Settings
from fedtune.models import add_lora, load_classifier, make_student, trainable_state


def state_shapes(algorithm: str, rank: int, settings: Settings) -> dict[str, torch.Size]:
    """Names and shapes of what one client sends (FedKDLoRA: the 3-block student)."""
    model = load_classifier(settings.model, 2, settings.seed)
    if algorithm == "fedkdlora":
        model = make_student(model)
    if algorithm != "fedavg":
        model = add_lora(model, rank, settings.lora_alpha)
    return {name: tensor.shape for name, tensor in trainable_state(model).items()}


def time_aggregation(algorithm: str, clients: int, rank: int, settings: Settings, repeats: int = 3) -> dict:
    rank = rank or settings.lora_r  # fedavg has no rank; any valid value
    ranks = ",".join([str(rank)] * clients)
    configured = settings.replace(algorithm=algorithm, clients=clients, lora_r=rank, client_ranks=ranks)
    algo = get_algorithm(algorithm, configured)
    shapes = state_shapes(algorithm, rank, settings)
    generator = torch.Generator().manual_seed(0)
    states = [{name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
              for _ in range(clients)]
    weights = torch.randint(20, 200, (clients,), generator=generator).float().tolist()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        algo.aggregate(states, weights)
        best = min(best, time.perf_counter() - start)
    return {"algorithm": algorithm, "clients": clients, "rank": None if algorithm == "fedavg" else rank,
            "parameters_per_client": sum(s.numel() for s in shapes.values()), "seconds": best}


def run(clients=(4, 16, 64), ranks=(4, 16, 64), settings: Settings | None = None) -> dict:
    settings = settings or Settings(task="sst2")
    rows = []
    for algorithm in ("fedlora", "fedkdlora", "flexlora", "hetlora"):
        for rank in ranks:
            for count in clients:
                rows.append(time_aggregation(algorithm, count, rank, settings))
    for count in clients[:2]:  # the whole model per client: 64 copies would need ~6 GB
        rows.append(time_aggregation("fedavg", count, 0, settings))
    return {"rows": rows}
