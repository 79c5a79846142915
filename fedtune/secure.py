"""Secure aggregation (SecAgg+, Bell et al. 2020) with Flower's own protocol implementation.

The round loop is the strategy's own (`FedTuneStrategy`, Flower's `Strategy.start`); SecAgg+ is
how a round's replies arrive (`SecureGrid`): Flower's `SecAggPlusWorkflow` (server) against
`secaggplus_mod` (clients):
clients exchange keys, secret-share their mask seeds, and send their update quantized and
masked, so the server learns only the example-weighted sum. Clients send their *update*
(trained state minus the state they received), not the state: updates are small, so the
quantization step (2 * `secagg-clip` / 2**22 per value) is a small relative error.

Secure aggregation hides individual replies, so fedtune's per-reply checks (NaN, shapes,
spoofed partitions) cannot run; a client that fails mid-round is dropped by the protocol
and its mask is removed with the other clients' shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedtune.comm import wire_bytes

KEYS = "state-keys"  # config entry naming the update's tensors (legacy Parameters are a bare list)


class MeteredGrid:
    """A Grid that counts the bytes of every message it sends and receives."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.bytes_down = self.bytes_up = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.bytes_down += sum(wire_bytes(m) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.bytes_up += sum(wire_bytes(m) for m in replies if not m.has_error())
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


@dataclass
class SecureSum:
    """What a SecAgg+ round gives the server: the unmasked example-weighted mean of the clients'
    updates, and each answering client's legacy fit result (its metrics; its update stays masked)."""

    mean_update: list[np.ndarray] | None
    results: list[FitRes]
    bytes_down: int
    bytes_up: int


class SecureGrid:
    """A Grid through which a round's train messages travel as Flower's SecAgg+ protocol.

    The strategy's round loop (Flower's `Strategy.start`) is unchanged: it builds the round's train
    messages as always and hands them to `send_and_receive`. Here they become the SecAgg+ workflow's
    fit instructions (same state and config to every sampled node), the protocol runs, and the
    replies that come back are none: the masked sum is left in `last` for
    `FedTuneStrategy.aggregate_train`. Any other message passes through.
    """

    def __init__(self, grid: Grid, clip: float, max_weight: int):
        self.grid = grid
        # Every sampled client holds a share of every other's secrets (1.0 = all of them); the
        # masks can be removed as long as 2/3 of the share holders answer the unmask stage.
        self.workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=2 / 3,
                                           clipping_range=clip, max_weight=max_weight)
        self.last: SecureSum | None = None

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return self.grid.send_and_receive(messages, timeout=timeout)
        content = messages[0].content
        if any(m.content is not content for m in messages):  # Algorithm.check_settings refuses such algorithms
            raise ValueError("SecAgg+ sends every sampled client the same message")
        arrays, config = content["arrays"], dict(content["config"])
        state = arrays.to_torch_state_dict()
        metered = MeteredGrid(self.grid)
        shim = _LegacyStrategy(metered, [m.metadata.dst_node_id for m in messages],
                               {**config, KEYS: ",".join(state)})
        run_id = self.grid.run.run_id
        legacy = LegacyContext(Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                               ServerConfig(num_rounds=int(config["server-round"])), strategy=shim)
        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([t.numpy() for t in state.values()]), True)
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: int(config["server-round"])})
        self.workflow.timeout = timeout
        self.workflow(metered, legacy)
        self.last = SecureSum(shim.mean_update, shim.results, metered.bytes_down, metered.bytes_up)
        return []

    def __getattr__(self, name):
        return getattr(self.grid, name)


class _LegacyStrategy:
    """The two methods `SecAggPlusWorkflow` calls on its (legacy) strategy: who trains on what
    (`configure_fit`), and where the unmasked weighted mean goes (`aggregate_fit`)."""

    def __init__(self, grid: MeteredGrid, node_ids: list[int], config: dict):
        self.grid, self.node_ids, self.config = grid, node_ids, config
        self.mean_update: list[np.ndarray] | None = None
        self.results: list[FitRes] = []

    def configure_fit(self, server_round, parameters, client_manager):
        fit_ins = FitIns(parameters, self.config)
        return [(GridClientProxy(node_id, self.grid, self.grid.run.run_id), fit_ins) for node_id in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        self.results = [fitres for _, fitres in results]
        # Every result carries the same unmasked weighted mean (the workflow's legacy convention).
        self.mean_update = parameters_to_ndarrays(results[0][1].parameters) if results else None
        return None, {}


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """Client side: Flower's `secaggplus_mod` for SecAgg+ messages, pass-through otherwise.

    In the masking stage the mod asks for a legacy fit result; this translates the legacy
    fit message to fedtune's train message, and the reply to the update as a FitRes.
    """
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def train_for_secagg(msg: Message, context: Context) -> Message:
        fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        keys = str(fit_ins.config.pop(KEYS)).split(",")
        received = {k: torch.from_numpy(a) for k, a in
                    zip(keys, parameters_to_ndarrays(fit_ins.parameters), strict=True)}
        msg.content = RecordDict({"arrays": ArrayRecord(received), "config": ConfigRecord(fit_ins.config)})
        reply = call_next(msg, context)
        trained = reply.content["arrays"].to_torch_state_dict()
        update = [(trained[k] - received[k]).numpy() for k in keys]
        metrics = dict(reply.content["metrics"])
        fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), int(metrics["num-examples"]), metrics)
        return Message(compat.fitres_to_recorddict(fit_res, keep_input=False), reply_to=msg)

    return secaggplus_mod(msg, context, train_for_secagg)
