"""Per-client LoRA ranks for heterogeneous resources (FlexLoRA, Bai et al. 2024)."""

from __future__ import annotations

import numpy as np

RANK_DISTRIBUTIONS = ("homo", "uniform", "heavy-tail-light", "heavy-tail-strong", "normal")


def rank_probabilities(distribution: str, num_ranks: int) -> np.ndarray:
    """Share of clients at each rank of the sorted rank set.

    heavy-tail-light halves the share at each larger rank (most clients small),
    heavy-tail-strong mirrors it (most clients large), normal is a discretised bell around
    the middle rank (sigma = num_ranks / 4), uniform is flat.
    """
    i = np.arange(num_ranks, dtype=float)
    weights = {
        "uniform": np.ones(num_ranks),
        "heavy-tail-light": 0.5**i,
        "heavy-tail-strong": 0.5 ** i[::-1],
        "normal": np.exp(-((i - (num_ranks - 1) / 2) ** 2) / (2 * (num_ranks / 4) ** 2)),
    }
    if distribution not in weights:
        raise ValueError(f"unknown rank-distribution {distribution!r} (known: {', '.join(RANK_DISTRIBUTIONS)})")
    return weights[distribution] / weights[distribution].sum()


def parse_ranks(text: str, what: str) -> list[int]:
    try:
        ranks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{what}={text!r} must be comma-separated whole numbers, e.g. '4,8,16,32'") from None
    if not ranks or min(ranks) <= 0:
        raise ValueError(f"{what}={text!r} must list positive ranks")
    return ranks


def assign_ranks(distribution: str, rank_set: str, num_clients: int, seed: int, default_rank: int,
                 client_ranks: str = "") -> list[int]:
    """Rank of each client (index = partition id), deterministic by seed.

    Counts follow the distribution by largest remainder (so 4 clients get the intended mix,
    not a lucky draw), then a seeded shuffle decides who gets which.
    """
    if client_ranks:
        ranks = parse_ranks(client_ranks, "client-ranks")
        if len(ranks) != num_clients:
            raise ValueError(f"client-ranks lists {len(ranks)} ranks for {num_clients} clients")
        return ranks
    if distribution == "homo":
        return [default_rank] * num_clients
    levels = sorted(set(parse_ranks(rank_set, "rank-set")))
    quota = rank_probabilities(distribution, len(levels)) * num_clients
    counts = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - counts), kind="stable")[: num_clients - counts.sum()]:
        counts[i] += 1
    ranks = np.repeat(levels, counts)
    return np.random.default_rng(seed).permutation(ranks).tolist()
