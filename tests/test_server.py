"""The server's handshake: fail clearly instead of waiting forever for clients."""

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune.server_app import handshake


class FakeGrid:
    """Just enough of flwr's Grid: connected node ids, and replies to the handshake query."""

    def __init__(self, partitions: dict[int, tuple[int, int]]):
        self.partitions = partitions  # node id -> (partition id, num partitions)

    def get_node_ids(self):
        return list(self.partitions)

    def send_and_receive(self, messages, timeout):
        replies = []
        for msg in messages:
            pid, n = self.partitions[msg.metadata.dst_node_id]
            TaskIdentity.node_id = msg.metadata.dst_node_id  # the replying node is the sender
            reply = Message(RecordDict({"metrics": MetricRecord({"partition-id": pid, "num-partitions": n})}),
                            dst_node_id=0, message_type="query")
            TaskIdentity.node_id = 0
            replies.append(reply)
        return replies


pytestmark = pytest.mark.usefixtures("task_identity")


def test_handshake_maps_partitions_to_nodes():
    grid = FakeGrid({11: (1, 2), 22: (0, 2)})
    assert handshake(grid, expected=2, timeout=1) == {0: 22, 1: 11}


def test_too_few_clients_fails_after_the_timeout():
    with pytest.raises(RuntimeError, match="only 1 of 3 clients connected"):
        handshake(FakeGrid({11: (0, 3)}), expected=3, timeout=0.2)


@pytest.mark.parametrize("partitions", [{11: (0, 2), 22: (0, 2)}, {11: (0, 3), 22: (1, 3)}, {11: (0, 2), 22: (5, 2)}])
def test_inconsistent_partitions_are_refused(partitions):
    with pytest.raises(RuntimeError, match="distinct partition-id"):
        handshake(FakeGrid(partitions), expected=2, timeout=1)
