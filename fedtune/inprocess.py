"""A simulation without Ray: the same ServerApp logic and ClientApp, in this one process.

`LocalGrid` is a Flower `Grid` (the interface the server talks to) that hands each message to
the ClientApp of its node right here, after a round trip through Flower's wire format (so a
client never shares an object with the server, as over gRPC or Ray), and returns the reply.
Clients run one after another with every core, as the Ray path runs them by default; the
per-client cost of Ray's actors and Flower's message store is gone. For tests, a laptop or a
single-GPU box (`--engine local`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1  # Flower's SuperLink node id


class LocalGrid(Grid):
    """`num_nodes` nodes in this process, node i+1 holding partition i."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1):
        self.client_app = client_app
        self.nodes = {1000 + i: i for i in range(num_nodes)}  # node id -> partition id
        self.contexts = {node: Context(run_id=run_id, node_id=node, state=RecordDict(), run_config={},
                                       node_config={"partition-id": p, "num-partitions": num_nodes})
                         for node, p in self.nodes.items()}
        self._run = Run.create_empty(run_id)
        self.waiting: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.waiting[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._deliver(self.waiting.pop(i)) for i in list(message_ids) if i in self.waiting]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, message: Message) -> Message:
        """Run the destination node's ClientApp on a copy of `message` (as it arrives over the wire)."""
        node = message.metadata.dst_node_id
        received = message_from_proto(message_to_proto(message))
        received.metadata.__dict__["_delivered_at"] = str(time.time())
        try:
            reply = self.client_app(received, self.contexts[node])
        except Exception as error:  # a failing client is a reply with an error, as in Flower's engines
            reply = Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=received)
        return message_from_proto(message_to_proto(reply))


def run_local(settings, client_app: ClientApp, quiet: bool = False):
    """Run the federation of `settings` in this process; returns the finished run folder."""
    from fedtune.console import quiet_libraries
    from fedtune.server_app import run_server

    quiet_libraries()
    previous = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
    try:
        return run_server(LocalGrid(client_app, settings.clients), settings, quiet)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous
