import numpy as np
import pytest
from datasets import Dataset

from fedtune.config import Settings
from fedtune.partition import partition_indices

ROWS = Dataset.from_dict({"sentence": [f"s{i}" for i in range(200)], "label": [int(i % 4 == 0) for i in range(200)]})


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_covering_and_deterministic(partition):
    settings = Settings(partition=partition, dirichlet_alpha=0.5, seed=3)
    parts = partition_indices(ROWS, settings, 4)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == 200
    again = partition_indices(ROWS, settings, 4)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))


def test_iid_partitions_are_equal_sized_and_shuffled():
    parts = partition_indices(ROWS, Settings(partition="iid"), 4)
    assert [len(p) for p in parts] == [50] * 4
    assert not np.array_equal(parts[0], np.arange(50))


def test_pathological_gives_each_client_one_label():
    labels = np.asarray(ROWS["label"])
    parts = partition_indices(ROWS, Settings(partition="pathological", classes_per_client=1), 4)
    assert all(len(set(labels[p].tolist())) == 1 for p in parts)


def test_dirichlet_small_alpha_skews_labels():
    labels = np.asarray(ROWS["label"])
    parts = partition_indices(ROWS, Settings(partition="dirichlet", dirichlet_alpha=0.05), 4)
    for label in (0, 1):  # iid would give each client ~1/4 of every label; alpha=0.05 gives one client most
        top_share = max((labels[p] == label).sum() for p in parts) / (labels == label).sum()
        assert top_share > 0.6


def test_impossible_minimum_fails_instead_of_looping():
    settings = Settings(partition="dirichlet", dirichlet_alpha=0.01, min_partition_size=45)
    with pytest.raises(ValueError, match="raise dirichlet-alpha"):
        partition_indices(ROWS, settings, 4)


def test_too_few_rows_for_the_clients():
    with pytest.raises(ValueError, match="use fewer clients"):
        partition_indices(ROWS, Settings(min_partition_size=10), 30)
