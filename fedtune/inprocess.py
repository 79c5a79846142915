"""A simulation without Ray: the same ServerApp logic and ClientApp, in this one process.

`LocalGrid` is a Flower `Grid` (the interface the server talks to) that hands each message to
the ClientApp of its node right here, after a round trip through Flower's wire format (so a
client never shares an object with the server, as over gRPC or Ray), and returns the reply.
Clients run one after another with every core, as the Ray path runs them by default, or, with
`batched` (`batched-clients`), the train messages of a round together: each client's app in its
own thread, their training steps taken in lockstep over the shared model (`fedtune.lockstep`).
The per-client cost of Ray's actors and Flower's message store is gone. For tests, a laptop or a
single-GPU box (`--engine local`).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterable

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedtune import lockstep

SERVER_NODE_ID = 1  # Flower's SuperLink node id


class LocalGrid(Grid):
    """`num_nodes` nodes in this process, node i+1 holding partition i."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1, batched: int = 0,
                 group: Callable[[int], Hashable] = lambda partition: 0):
        # batched: clients per lockstep room (0: one at a time); group: which partitions may share a
        # room (those that build the same model, e.g. the same LoRA rank)
        self.client_app, self.batched, self.group = client_app, batched, group
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
        messages = [self.waiting.pop(i) for i in list(message_ids) if i in self.waiting]
        if self.batched and len(messages) > 1 and all(m.metadata.message_type == MessageType.TRAIN
                                                      for m in messages):
            groups: dict[Hashable, list[Message]] = {}
            for message in messages:
                groups.setdefault(self.group(self.nodes[message.metadata.dst_node_id]), []).append(message)
            return [reply for members in groups.values() for start in range(0, len(members), self.batched)
                    for reply in self._deliver_together(members[start:start + self.batched])]
        return [self._deliver(message) for message in messages]

    def _deliver_together(self, messages: list[Message]) -> list[Message]:
        """Every message's ClientApp in its own thread, their training in one `lockstep.Room`; the
        k-th message's rows come k-th in each combined batch, so results do not depend on threads."""
        room, replies = lockstep.Room(len(messages)), [None] * len(messages)

        def deliver(k: int) -> None:
            member = lockstep.Member(k)
            lockstep.seat(room, member)
            try:
                replies[k] = self._deliver(messages[k])
            finally:
                room.leave(member)  # a client that failed before training is not waited for
                lockstep.seat(room, None)

        threads = [threading.Thread(target=deliver, args=(k,), name=f"client-{k}") for k in range(len(messages))]
        for thread in threads:
            thread.start()
        room.serve()  # the combined steps, here, until every client has left
        for thread in threads:
            thread.join()
        return replies

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
    from fedtune.local import batched_clients
    from fedtune.client_app import algorithm_for
    from fedtune.server_app import run_server

    quiet_libraries()
    previous = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE_ID, 1
    try:
        algorithm = algorithm_for(settings)
        room = max(1, lockstep.ROOM_ROWS // settings.batch_size) if batched_clients(algorithm) else 0
        return run_server(LocalGrid(client_app, settings.clients, batched=room, group=algorithm.client_settings),
                          settings, quiet)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous
