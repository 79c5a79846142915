"""Secure aggregation (SecAgg+, Bell et al. 2020) with Flower's own protocol implementation.

Each round runs Flower's `SecAggPlusWorkflow` (server) against `secaggplus_mod` (clients):
clients exchange keys, secret-share their mask seeds, and send their update quantized and
masked, so the server learns only the example-weighted sum. Clients send their *update*
(trained state minus the state they received), not the state: updates are small, so the
quantization step (2 * `secagg-clip` / 2**22 per value) is a small relative error.

Secure aggregation hides individual replies, so fedtune's per-reply checks (NaN, shapes,
spoofed partitions) cannot run; a client that fails mid-round is dropped by the protocol
and its mask is removed with the other clients' shares.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

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
from fedtune.strategy import FedTuneStrategy, RoundStats

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


class SecureRounds:
    """Runs `strategy`'s rounds with SecAgg+ in place of plain replies.

    Same `start` as a Flower strategy, so the server app treats it like one. What
    `SecAggPlusWorkflow` needs from a legacy strategy is `configure_fit` (who trains, on
    what) and `aggregate_fit` (receives the unmasked weighted mean); both are here.
    """

    def __init__(self, strategy: FedTuneStrategy, clip: float, max_weight: int):
        if len(strategy.sample(1)) < 2:
            raise ValueError("secure-aggregation needs at least 2 sampled clients per round; "
                             "raise `clients` or `fraction-train`")
        self.strategy = strategy
        # Every sampled client holds a share of every other's secrets (1.0 = all of them); the
        # masks can be removed as long as 2/3 of the share holders answer the unmask stage.
        self.workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=2 / 3,
                                           clipping_range=clip, max_weight=max_weight)
        self.round_config: dict = {}
        self.mean_update: list[np.ndarray] | None = None
        self.results: list[FitRes] = []

    # -- the two methods SecAggPlusWorkflow calls on its "strategy"
    def configure_fit(self, server_round, parameters, client_manager):
        fit_ins = FitIns(parameters, self.round_config)
        return [(GridClientProxy(self.strategy.nodes[p], self.grid, self.run_id), fit_ins)
                for p in self.strategy.sample(server_round)]

    def aggregate_fit(self, server_round, results, failures):
        self.results = [fitres for _, fitres in results]
        # Every result carries the same unmasked weighted mean (the workflow's legacy convention).
        self.mean_update = parameters_to_ndarrays(results[0][1].parameters) if results else None
        return None, {}

    # -- the strategy-like entry point the server app calls
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int, timeout: float,
              train_config: ConfigRecord, evaluate_fn) -> SimpleNamespace:
        strategy = self.strategy
        self.grid = MeteredGrid(grid)
        self.workflow.timeout = timeout
        self.run_id = grid.run.run_id
        context = Context(run_id=self.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
        legacy = LegacyContext(context, ServerConfig(num_rounds=num_rounds), strategy=self)
        state = initial_arrays.to_torch_state_dict()
        evaluate_fn(0, initial_arrays)
        for flower_round in range(1, num_rounds + 1):
            server_round = flower_round + strategy.offset
            sampled = strategy.sample(server_round)
            lr = strategy.lr_at(server_round)
            self.round_config = {**dict(train_config), **strategy.algorithm.round_config(server_round),
                                 "server-round": server_round, "lr": lr, KEYS: ",".join(state)}
            self.mean_update, self.results = None, []
            self.grid.bytes_up = self.grid.bytes_down = 0
            legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                ndarrays_to_parameters([t.numpy() for t in state.values()]), True)
            legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
            self.workflow(self.grid, legacy)
            answered = {int(r.metrics["partition-id"]) for r in self.results}
            dropped = [{"node": strategy.nodes[p], "reason": "no masked update (failed, timed out, or the "
                        "protocol halted)"} for p in sampled if p not in answered]
            stats = RoundStats(sampled=sampled, lr=lr, bytes_up=self.grid.bytes_up, bytes_down=self.grid.bytes_down,
                               received=len(self.results), accepted=len(self.results), dropped=dropped)
            if self.mean_update is not None:
                start = time.perf_counter()
                previous = state
                state = {k: v + torch.from_numpy(np.asarray(u)).to(v.dtype)
                         for (k, v), u in zip(state.items(), self.mean_update, strict=True)}
                stats.aggregate_seconds = time.perf_counter() - start
                start = time.perf_counter()
                state, server_metrics = strategy.algorithm.after_aggregation(state, server_round, previous)
                stats.server_seconds = time.perf_counter() - start
                weights = [r.num_examples for r in self.results]
                stats.train_loss = float(np.average([r.metrics["train-loss"] for r in self.results],
                                                       weights=weights))
                stats.examples_seen = int(sum(r.metrics["examples-seen"] for r in self.results))
                stats.client_train_seconds = float(sum(r.metrics.get("train-seconds", 0.0) for r in self.results))
                stats.extra = server_metrics
            strategy.rounds[server_round] = stats
            evaluate_fn(flower_round, ArrayRecord(state))
        return SimpleNamespace(arrays=ArrayRecord(state))


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
