import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

import pytest
from flwr.supercore.task_identity import TaskIdentity

from fedtune.algorithms import get_algorithm
from fedtune.strategy import FedTuneStrategy


pytestmark = pytest.mark.usefixtures("task_identity")


def reply(state: dict, partition_id: int, examples: int, node_id: int | None = None, **metric_overrides) -> Message:
    TaskIdentity.node_id = 100 + partition_id if node_id is None else node_id  # the sender
    metrics = {"num-examples": examples, "partition-id": partition_id, "train-loss": 0.5, "examples-seen": examples}
    metrics.update(metric_overrides)
    content = RecordDict({"arrays": ArrayRecord(state),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, dst_node_id=0, message_type="train")


def make_strategy(fraction=1.0, seed=0):
    nodes = {p: 100 + p for p in range(4)}
    return FedTuneStrategy(get_algorithm("fedlora"), nodes, fraction, seed, lr_at=lambda r: 0.1)


def test_garbage_replies_are_dropped_and_the_rest_averaged():
    strategy = make_strategy()
    strategy.sent = {p: {"w": torch.zeros(2)} for p in range(4)}
    replies = [
        reply({"w": torch.tensor([1.0, 1.0])}, 0, examples=1),
        reply({"w": torch.tensor([4.0, 7.0])}, 1, examples=2),
        reply({"w": torch.tensor([float("nan"), 0.0])}, 2, examples=100),
        reply({"w": torch.zeros(5)}, 3, examples=100),
        reply({"v": torch.zeros(2)}, 3, examples=100),
        reply({"w": torch.tensor([1.0, 1.0])}, 3, examples=100, node_id=101),  # spoofs partition 3
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    # (1 * [1, 1] + 2 * [4, 7]) / 3 = [3, 5]
    assert np.allclose(arrays["w"].numpy(), [3.0, 5.0])
    stats = strategy.rounds[1]
    assert stats.accepted == 2 and len(stats.dropped) == 4
    reasons = " | ".join(d["reason"] for d in stats.dropped)
    for expected in ("NaN or Inf", "shape", "keys differ", "not sent to node 101"):
        assert expected in reasons


def test_duplicate_and_nan_loss_replies_are_dropped():
    strategy = make_strategy()
    strategy.sent = {0: {"w": torch.zeros(2)}, 1: {"w": torch.zeros(2)}}
    replies = [reply({"w": torch.ones(2)}, 0, examples=1), reply({"w": 5 * torch.ones(2)}, 0, examples=1),
               reply({"w": torch.ones(2)}, 1, examples=1, **{"train-loss": float("nan")})]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), [1.0, 1.0])  # only the first reply of partition 0
    reasons = " | ".join(d["reason"] for d in strategy.rounds[1].dropped)
    assert "second reply for partition 0" in reasons and "train-loss is nan" in reasons


def test_reply_without_weight_is_dropped():
    strategy = make_strategy()
    strategy.sent = {0: {"w": torch.zeros(2)}}
    arrays, _ = strategy.aggregate_train(1, [reply({"w": torch.ones(2)}, 0, examples=0)])
    assert arrays is None and "num-examples" in strategy.rounds[1].dropped[0]["reason"]


def test_sampling_is_seeded_and_sized():
    strategy = make_strategy(fraction=0.5, seed=1)
    first = [strategy.sample(r) for r in range(1, 6)]
    again = [make_strategy(fraction=0.5, seed=1).sample(r) for r in range(1, 6)]
    assert first == again
    assert all(len(s) == 2 and len(set(s)) == 2 for s in first)
    assert len({tuple(s) for s in first}) > 1  # rounds differ
    assert make_strategy(fraction=0.1).sample(1).__len__() == 1  # at least one client


def test_uniform_client_weighting_is_the_unweighted_mean():
    from fedtune.config import Settings

    nodes = {p: 100 + p for p in range(2)}
    strategy = FedTuneStrategy(get_algorithm("fedlora", Settings(client_weighting="uniform")), nodes, 1.0, 0,
                               lr_at=lambda r: 0.1)
    strategy.sent = {p: {"w": torch.zeros(2)} for p in range(2)}
    replies = [reply({"w": torch.tensor([1.0, 1.0])}, 0, examples=1),
               reply({"w": torch.tensor([4.0, 7.0])}, 1, examples=2)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), [2.5, 4.0])  # ([1, 1] + [4, 7]) / 2, not (1 * . + 2 * .) / 3
