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


def _printed_at_80_columns(title: str, row: dict) -> str:
    """What fedtune's table printer writes for `row` on an 80-column terminal."""
    import io

    from rich.console import Console

    import fedtune.console

    out = io.StringIO()
    console, fedtune.console.console = fedtune.console.console, Console(file=out, width=80)
    try:
        fedtune.console.print_table(title, [row])
    finally:
        fedtune.console.console = console
    return out.getvalue()


def test_the_round_table_fits_an_80_column_terminal():
    """A CoLA FedKDLoRA record (the widest: MCC, balanced accuracy, teacher metrics) prints whole."""
    from fedtune.server_app import _row

    record = {"round": 10, "dev_loss": 0.6123, "dev_accuracy": 0.6912, "dev_mcc": -0.1234, "dev_auc": 0.55,
              "dev_balanced_accuracy": 0.5012, "dev_worst_class_recall": 0.0, "teacher_dev_accuracy": 0.7,
              "teacher_dev_mcc": 0.14, "teacher_dev_loss": 0.6, "train_loss": 0.5987, "bytes_up": 634_000,
              "bytes_down": 608_000, "cum_bytes_up": 6_340_000, "cum_bytes_down": 6_080_000, "seconds": 123.4}
    text = _printed_at_80_columns("fedkdlora on cola", _row(record))
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "-0.123" in text and "0.501" in text and "12.4" in text  # mcc, balanced accuracy, MB in all


def test_the_centralized_epoch_table_fits_an_80_column_terminal():
    """A CoLA record (MCC and every skew metric) of a long run prints whole: no cell cut to '…'."""
    from fedtune.centralized import _row

    record = {"epoch": 0.25, "step": 421, "train_loss": 0.41003, "dev_loss": 0.31301, "dev_accuracy": 0.86238,
              "dev_mcc": -0.12345, "dev_balanced_accuracy": 0.86229, "dev_worst_class_recall": 0.85747,
              "dev_auc": 0.94206, "samples": 1_347_200, "seconds": 12721.26}
    text = _printed_at_80_columns("lora on cola", _row(record))
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert all(v in text for v in ("-0.123", "0.862", "0.857", "0.942", "1347200", "12721", "0.25"))
