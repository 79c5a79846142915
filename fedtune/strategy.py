"""The Flower strategy: Flower's FedAvg loop, with fedtune's sampling, checks and byte counts."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune import fednova, scaffold
from fedtune.algorithms import Algorithm
from fedtune.algorithms.aggregate import invalid_reason
from fedtune.codecs import LAYOUT, Broadcast, Codec
from fedtune.comm import wire_bytes
from fedtune.secure import SecureGrid

log = logging.getLogger("fedtune")


@dataclass
class RoundStats:
    """What one round of training did, as the strategy (or the SecAgg+ runner) saw it; the
    server app turns it into the round's line of rounds.jsonl."""

    sampled: list[int] = field(default_factory=list)  # partition ids sent a train message
    lr: float | None = None  # the local learning rate sent
    bytes_down: int = 0
    bytes_up: int = 0
    received: int = 0
    accepted: int = 0
    dropped: list[dict] = field(default_factory=list)  # {"node", "reason"} per reply not used
    aggregate_seconds: float = 0.0
    server_seconds: float = 0.0  # the algorithm's after_aggregation (server_update, server fine-tuning)
    train_loss: float | None = None  # example-weighted mean over accepted replies
    examples_seen: int = 0
    client_train_seconds: float = 0.0  # the accepted clients' training loops, summed (the rest of a turn is overhead)
    extra: dict[str, float] = field(default_factory=dict)  # client extras (teacher-*) and server metrics


class FedTuneStrategy(FedAvg):
    """FedAvg's round loop with an algorithm's own aggregation.

    Differences from `flwr.serverapp.strategy.FedAvg`:
    - clients are sampled with a seeded generator from the nodes found at the handshake,
      so a run repeats exactly;
    - a reply with an error, NaN/Inf, missing keys or wrong shapes is dropped with a
      logged reason instead of failing the round or being averaged in;
    - a reply encoded by a codec (fp16, int8, SVD) is decoded before any check;
    - with `codec-down` the train messages carry the state encoded; the client trains from the
      decoded copy and the server moves its change onto the exact state (`Broadcast.rebase`);
    - replies are aggregated in partition order by `algorithm.aggregate`, then
      `algorithm.after_aggregation` runs any server-side training (FedKDLoRA's distillation,
      `server-finetune-steps`);
    - bytes up and down are measured on the messages themselves;
    - with `secagg` the round's replies arrive through SecAgg+ (`fedtune.secure.SecureGrid`):
      the same loop, sampling and hooks, but the server receives only the clients' masked
      example-weighted sum (algorithms that need more are refused at start-up).

    Parameters
    ----------
    algorithm : Algorithm
        Provides `aggregate(states, weights)`.
    nodes : dict[int, int]
        Partition id -> node id of every client (from `handshake`).
    fraction_train : float
        Fraction of clients sampled each round (at least one).
    seed : int
        Seed of the client sampling.
    lr_at : Callable[[int], float]
        Local learning rate for a round (the schedule over rounds); sent as `lr`.
    codec : Codec, optional
        How clients encode their replies (default: plain fp32 states).
    secagg : tuple[float, int], optional
        (clipping range, largest client weight) of SecAgg+ rounds; None: plain replies.
    model : nn.Module, optional
        The server's model, handed to the algorithm's server-side hooks (`after_aggregation`);
        algorithms without server-side training do not need it.
    """

    def __init__(self, algorithm: Algorithm, nodes: dict[int, int], fraction_train: float, seed: int,
                 lr_at: Callable[[int], float], codec: Codec | None = None, secagg: tuple[float, int] | None = None,
                 model: nn.Module | None = None):
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0, min_train_nodes=1,
                         min_available_nodes=len(nodes))
        self.algorithm = algorithm
        self.codec = codec or Codec("none")
        self.nodes = dict(sorted(nodes.items()))
        self.seed = seed
        self.lr_at = lr_at
        self.offset = 0  # rounds already done before `start` (a resumed run)
        self.uniform_weights = False  # DP: every client weighs the same (the noise is calibrated to that)
        self.rounds: dict[int, RoundStats] = {}  # per-round accounting, read by the server app
        self.sent: dict[int, dict] = {}  # partition id -> state sent this round: its reply must match it
        self.broadcasts: dict[int, Broadcast] = {}  # partition id -> the encoded broadcast (codec-down)
        self.global_state: dict = {}  # the global state at the start of this round
        self.control: dict = {}  # SCAFFOLD's server control variate c (scaffold=1), zeros until round 1
        self.control_deltas: dict[int, dict] = {}  # partition id -> its dc_i this round
        self.secagg = secagg
        self.model = model
        self.secure_grid: SecureGrid | None = None  # set by `start` when secagg is on
        if secagg and len(self.sample(1)) < 2:
            raise ValueError("secure-aggregation needs at least 2 sampled clients per round; "
                             "raise `clients` or `fraction-train`")

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None):
        """Flower's round loop; with SecAgg+, over a grid that carries train messages as the protocol."""
        if self.secagg:
            grid = self.secure_grid = SecureGrid(grid, *self.secagg)
        return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn)

    def sample(self, server_round: int) -> list[int]:
        """Partition ids trained this round: a seeded draw without replacement."""
        count = max(1, math.floor(self.fraction_train * len(self.nodes) + 1e-9))
        rng = np.random.default_rng([self.seed, server_round])
        return sorted(rng.choice(list(self.nodes), size=count, replace=False).tolist())

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.offset
        config["server-round"] = server_round
        config["lr"] = self.lr_at(server_round)
        config.update(self.algorithm.round_config(server_round))
        global_state = arrays.to_torch_state_dict()
        self.global_state = global_state  # what this round's updates are relative to
        scaffold_on = bool(self.algorithm.settings.scaffold)
        if scaffold_on and not self.control:
            self.control = scaffold.zeros_like(global_state)
        sampled = self.sample(server_round)
        self.sent = {p: self.algorithm.client_state(global_state, p) for p in sampled}
        codec_down = self.algorithm.settings.codec_down
        broadcasts: dict[int, Broadcast] = {}  # id(state) -> its encoding, made once per distinct state
        for state in self.sent.values():
            if id(state) not in broadcasts:
                broadcasts[id(state)] = Broadcast(state, codec_down)
        self.broadcasts = {p: broadcasts[id(state)] for p, state in self.sent.items()}
        records: dict = {}  # one record per distinct state (most algorithms send one), one per client with extras
        messages = []
        for p in sampled:
            state, extras = self.sent[p], self.algorithm.downlink_extras(p, server_round)
            key = ("client", p) if extras else id(state)
            if key not in records:
                broadcast = self.broadcasts[p]
                arrays_p = (arrays if state is global_state and codec_down == "none" else ArrayRecord(broadcast.arrays))
                content = {self.arrayrecord_key: arrays_p, self.configrecord_key: config}
                if broadcast.layout:
                    content[LAYOUT] = ConfigRecord(broadcast.layout)
                if scaffold_on:
                    content[scaffold.RECORD] = ArrayRecord(self.control)
                records[key] = RecordDict(content | ({"extras": ArrayRecord(extras)} if extras else {}))
            messages.append(Message(content=records[key], message_type=MessageType.TRAIN, dst_node_id=self.nodes[p]))
        self.rounds[server_round] = RoundStats(sampled=sampled, lr=config["lr"],
                                               bytes_down=sum(wire_bytes(m) for m in messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.offset
        stats = self.rounds.setdefault(server_round, RoundStats())
        received = self.receive_secure(stats) if self.secure_grid else self.receive(server_round, list(replies), stats)
        if received is None:
            log.warning("round %d: no usable reply; the global model is unchanged", server_round)
            return None, None
        aggregated, metrics, weights = received
        start = time.perf_counter()
        aggregated, server_metrics = self.algorithm.after_aggregation(self.model, aggregated, server_round,
                                                                      self.global_state)
        stats.server_seconds = time.perf_counter() - start
        stats.train_loss = float(np.average([m["train-loss"] for m in metrics], weights=weights))
        stats.examples_seen = int(sum(m["examples-seen"] for m in metrics))
        stats.client_train_seconds = float(sum(m.get("train-seconds", 0.0) for m in metrics))
        # Per-client extras (e.g. each client's teacher on the dev set): example-weighted means.
        extras = sorted({key for m in metrics for key in m if key.startswith("teacher-")})
        stats.extra = {key.replace("-", "_"): float(np.average([m[key] for m in metrics], weights=weights))
                       for key in extras if all(key in m for m in metrics)}
        stats.extra.update(server_metrics)
        record = MetricRecord({"train-loss": stats.train_loss, "examples-seen": stats.examples_seen})
        return ArrayRecord(aggregated), record

    def receive(self, server_round: int, replies: list[Message], stats: RoundStats):
        """Plain replies: each checked, then combined by the algorithm. (aggregated state, the
        accepted replies' metrics, their weights), or None when no reply is usable."""
        stats.bytes_up = sum(wire_bytes(m) for m in replies if not m.has_error())
        accepted, dropped, answered = [], [], set()
        for msg in replies:
            state, reason = self.check(msg)
            if reason is None:
                partition_id = int(msg.content["metrics"]["partition-id"])
                reason = f"second reply for partition {partition_id}" if partition_id in answered else None
                answered.add(partition_id)
            if reason:
                dropped.append({"node": msg.metadata.src_node_id, "reason": reason})
                log.warning("round %d: dropped reply from node %d: %s", server_round, msg.metadata.src_node_id, reason)
            else:
                accepted.append((int(msg.content["metrics"]["partition-id"]), state, msg.content["metrics"]))
        stats.received, stats.accepted, stats.dropped = len(replies), len(accepted), dropped
        if not accepted:
            return None
        accepted.sort(key=lambda item: item[0])
        if self.algorithm.settings.scaffold:  # c <- c + (1/N) sum dc_i over the round's accepted clients
            deltas = [self.control_deltas[p] for p, _, _ in accepted]
            self.control = scaffold.server_control(self.control, deltas, len(self.nodes))
        states = [state for _, state, _ in accepted]
        metrics = [m for _, _, m in accepted]
        uniform = self.uniform_weights or self.algorithm.settings.client_weighting == "uniform"
        weights = [1.0 if uniform else float(m["num-examples"]) for m in metrics]
        start = time.perf_counter()
        if self.algorithm.settings.fednova:  # x + tau_eff sum_i p_i (y_i - x) / tau_i
            steps = [int(m[fednova.METRIC]) for m in metrics]
            aggregated = fednova.normalized_average(self.global_state, states, weights, steps)
        else:
            aggregated = self.algorithm.aggregate(states, weights)
        stats.aggregate_seconds = time.perf_counter() - start
        return aggregated, metrics, weights

    def receive_secure(self, stats: RoundStats):
        """A SecAgg+ round: the global state plus the unmasked example-weighted mean update (the
        weighted mean of the clients' states, as `Algorithm.aggregate` computes it), or None when
        the protocol gave no sum. Bytes are every protocol message's."""
        secure, self.secure_grid.last = self.secure_grid.last, None
        stats.bytes_down, stats.bytes_up = secure.bytes_down, secure.bytes_up
        answered = {int(r.metrics["partition-id"]) for r in secure.results}
        stats.dropped = [{"node": self.nodes[p], "reason": "no masked update (failed, timed out, or the protocol "
                          "halted)"} for p in stats.sampled if p not in answered]
        stats.received = stats.accepted = len(secure.results)
        if secure.mean_update is None:
            return None
        start = time.perf_counter()
        aggregated = {k: v + torch.from_numpy(np.asarray(u)).to(v.dtype)
                      for (k, v), u in zip(self.global_state.items(), secure.mean_update, strict=True)}
        stats.aggregate_seconds = time.perf_counter() - start
        return aggregated, [r.metrics for r in secure.results], [float(r.num_examples) for r in secure.results]

    def check(self, msg: Message) -> tuple[dict | None, str | None]:
        """(decoded client state, None) for a usable reply, else (None, why not)."""
        if msg.has_error():
            return None, f"client error: {msg.error.reason}"
        content = msg.content
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            return None, "reply lacks the 'arrays' or 'metrics' record"
        metrics = content["metrics"]
        for key in ("num-examples", "partition-id", "train-loss", "examples-seen"):
            if key not in metrics:
                return None, f"metrics lack {key!r}"
        if not metrics["num-examples"] > 0:
            return None, f"num-examples is {metrics['num-examples']}"
        if not math.isfinite(metrics["train-loss"]):
            return None, f"train-loss is {metrics['train-loss']}"
        partition_id = int(metrics["partition-id"])
        if partition_id not in self.sent or self.nodes[partition_id] != msg.metadata.src_node_id:
            return None, f"claims partition {partition_id}, which was not sent to node {msg.metadata.src_node_id}"
        broadcast = self.broadcasts.get(partition_id)
        received = broadcast.received if broadcast else self.sent[partition_id]
        try:
            state = self.codec.decode(content["arrays"].to_torch_state_dict(), received)
        except ValueError as error:
            return None, str(error)
        if broadcast and invalid_reason(state, received) is None:
            state = broadcast.rebase(state)
        reason = invalid_reason(state, self.sent[partition_id])
        if reason is None and self.algorithm.settings.fednova and not metrics.get(fednova.METRIC, 0) >= 1:
            reason = f"fednova=1 needs the client's {fednova.METRIC} (>= 1) in its metrics"
        if reason is None and self.algorithm.settings.scaffold:
            if scaffold.RECORD not in content.array_records:
                return None, "reply lacks the SCAFFOLD variate record"
            deltas = content[scaffold.RECORD].to_torch_state_dict()
            reason = scaffold.check_variates(deltas, self.sent[partition_id])
            self.control_deltas[partition_id] = deltas
        return (None, reason) if reason else (state, None)
