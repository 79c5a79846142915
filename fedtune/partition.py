"""Split the private train rows across clients with flwr-datasets partitioners."""

from __future__ import annotations

import functools

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner, Partitioner

from fedtune.config import Settings
from fedtune.data import cached_task_data

# DirichletPartitioner resamples until every partition reaches its minimum size, forever
# if it cannot. We ask it for no minimum and retry with derived seeds a bounded number of times.
DIRICHLET_TRIES = 100


def _partitioner(settings: Settings, num_partitions: int, seed: int) -> Partitioner:
    if settings.partition == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if settings.partition == "dirichlet":
        return DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                    alpha=settings.dirichlet_alpha, min_partition_size=0, seed=seed)
    if settings.partition == "pathological":
        return PathologicalPartitioner(num_partitions=num_partitions, partition_by="label",
                                       num_classes_per_partition=settings.classes_per_client, seed=seed)
    raise ValueError(f"unknown partition {settings.partition!r} (known: iid, dirichlet, pathological)")


def partition_indices(rows: Dataset, settings: Settings, num_partitions: int) -> list[np.ndarray]:
    """Row indices of each client's partition; deterministic by seed, disjoint, covering."""
    if len(rows) < num_partitions * max(1, settings.min_partition_size):
        raise ValueError(f"{len(rows)} train rows cannot give {num_partitions} clients "
                         f"{max(1, settings.min_partition_size)} rows each; use fewer clients or a larger train-limit")
    # IidPartitioner splits in order, so shuffle first (seeded) for a random split.
    indexed = rows.add_column("_row", list(range(len(rows)))).shuffle(seed=settings.seed)
    tries = DIRICHLET_TRIES if settings.partition == "dirichlet" else 1
    for attempt in range(tries):
        partitioner = _partitioner(settings, num_partitions, settings.seed + attempt)
        partitioner.dataset = indexed
        parts = [np.sort(np.asarray(partitioner.load_partition(k)["_row"], dtype=np.int64))
                 for k in range(num_partitions)]
        if min(len(p) for p in parts) >= max(1, settings.min_partition_size):
            return parts
    raise ValueError(f"partition=dirichlet with dirichlet-alpha={settings.dirichlet_alpha} left some of the "
                     f"{num_partitions} clients with fewer than {max(1, settings.min_partition_size)} rows in "
                     f"{tries} draws; raise dirichlet-alpha, lower min-partition-size, or use fewer clients")


@functools.lru_cache(maxsize=4)
def client_partitions(settings: Settings, num_partitions: int) -> tuple[np.ndarray, ...]:
    """`partition_indices` over the private rows, once per process."""
    return tuple(partition_indices(cached_task_data(settings).private, settings, num_partitions))


def partition_report(settings: Settings, num_partitions: int) -> list[dict]:
    """Size and label histogram of every partition (saved with the run)."""
    labels = np.asarray(cached_task_data(settings).private["label"])
    return [{"partition-id": k, "size": int(len(idx)),
             "labels": {str(c): int(n) for c, n in zip(*np.unique(labels[idx], return_counts=True))}}
            for k, idx in enumerate(client_partitions(settings, num_partitions))]
