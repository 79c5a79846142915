"""Flower ServerApp: handshake, Flower's round loop, per-round records, final model and plots."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtune.algorithms import get_algorithm
from fedtune.codecs import Codec
from fedtune.config import Settings
from fedtune.console import print_table, progress_bar, quiet_libraries, say
from fedtune.local import cached_model, evaluate_state, initial_state
from fedtune.models import load_tokenizer, load_trainable_state
from fedtune.partition import partition_report
from fedtune.plots import plot_partitions, plot_rounds
from fedtune.privacy import PrivacyLedger, private
from fedtune.runs import RunDir
from fedtune.secure import SecureRounds
from fedtune.strategy import FedTuneStrategy
from fedtune.teacher import pretrain_teacher

CHECKPOINT = "checkpoint.pt"


def handshake(grid: Grid, expected: int, timeout: float) -> dict[int, int]:
    """Wait for `expected` nodes and learn each one's partition id: {partition id: node id}.

    Flower's own sampling waits forever for missing nodes; this fails after `timeout`.
    """
    deadline = time.monotonic() + timeout
    while len(node_ids := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of {expected} clients connected within {timeout:.0f} s; "
                               f"start more SuperNodes or lower `clients`")
        time.sleep(0.5)
    queries = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
    nodes: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed the handshake: {reply.error.reason}")
        metrics = reply.content["metrics"]
        partition_id, num_partitions = int(metrics["partition-id"]), int(metrics["num-partitions"])
        if num_partitions != expected or partition_id in nodes or not 0 <= partition_id < expected:
            raise RuntimeError(f"node {reply.metadata.src_node_id} holds partition {partition_id} of "
                               f"{num_partitions}; every node needs a distinct partition-id in 0..{expected - 1} "
                               f"and num-partitions={expected}")
        nodes[partition_id] = reply.metadata.src_node_id
    if len(nodes) < expected:
        raise RuntimeError(f"only {len(nodes)} of {expected} clients answered the handshake")
    return nodes


def open_run(settings: Settings) -> tuple[RunDir, dict | None]:
    """A new run folder, or with `resume` the interrupted one and its last checkpoint."""
    if not settings.resume:
        return RunDir(settings.out_dir, f"{settings.algorithm}-{settings.task}", settings), None
    run = RunDir.reopen(settings.resume)
    if not (run.path / CHECKPOINT).is_file():
        raise FileNotFoundError(f"{run.path} has no {CHECKPOINT}: it stopped before round 0 finished; start it anew")
    saved = json.loads((run.path / "config.json").read_text())
    differ = [k for k, v in settings.to_dict().items() if k != "resume" and saved.get(k) != v]
    if differ:
        raise ValueError(f"settings differ from the run being resumed in {', '.join(differ)}; "
                         f"resume with `fedtune resume {run.path}`, which reads its config.json")
    return run, torch.load(run.path / CHECKPOINT, weights_only=False)


def save_checkpoint(run: RunDir, state: dict, algorithm_state: dict, records: list[dict]) -> None:
    """Everything a resumed server needs after a round, written atomically."""
    tmp = run.path / (CHECKPOINT + ".tmp")
    torch.save({"global": state, "algorithm": algorithm_state, "records": records}, tmp)
    os.replace(tmp, run.path / CHECKPOINT)


def run_server(grid: Grid, settings: Settings, quiet: bool = False) -> Path:
    """Run the whole federation (or resume it, with `resume`); returns the finished run folder."""
    algorithm = get_algorithm(settings.algorithm, settings)
    teacher_dev = {}
    if algorithm.needs_teacher:  # before the handshake: clients may need it from round 1
        teacher = pretrain_teacher(settings, quiet)
        teacher_dev = {f"teacher_dev_{k}": v for k, v in
                       json.loads((teacher / "teacher.json").read_text())["dev"].items()}
    nodes = handshake(grid, settings.clients, settings.round_timeout)
    run, checkpoint = open_run(settings)
    partitions = partition_report(settings, settings.clients)
    if ranks := algorithm.summary_fields()["client_ranks"]:  # record who trains at which LoRA rank
        for p in partitions:
            p["lora-r"] = ranks[p["partition-id"]]
    run.write_json("partitions.json", partitions)
    codec = Codec(settings.codec, settings.svd_energy_start, settings.svd_energy_end, settings.rounds)
    strategy = FedTuneStrategy(algorithm, nodes, settings.fraction_train, settings.seed, algorithm.round_lr, codec)
    runner = private(strategy, settings)  # the DP wrapper around it, when dp-noise > 0
    if settings.secure_aggregation == "secagg+":
        runner = SecureRounds(strategy, settings.secagg_clip, max_weight=max(p["size"] for p in partitions))
    ledger = PrivacyLedger(settings, len(strategy.sample(1))) if settings.dp_noise > 0 else None
    state = initial_state(algorithm)
    travelling = sum(t.numel() for t in state.values())
    records: list[dict] = []
    if checkpoint:
        state, records = checkpoint["global"], checkpoint["records"]
        algorithm.restore(checkpoint["algorithm"])
        run.write_jsonl("rounds.jsonl", records)  # drops a round that never reached its checkpoint
        strategy.offset = records[-1]["round"]
        for record in records:  # the privacy already spent
            if ledger and "dp_epsilon" in record:
                ledger.release()
        say(f"resuming {run.path} after round {strategy.offset}", quiet)
    say(f"[bold]{settings.algorithm}[/] on {settings.task}: {settings.clients} clients, {settings.rounds} rounds, "
        f"{travelling:,} parameters travel -> {run.path}", quiet)
    now = time.perf_counter()
    clock = {"last": now, "start": now - (records[-1]["elapsed"] if records else 0.0)}

    with progress_bar(settings.rounds, "rounds", quiet) as update:
        def evaluate_fn(flower_round: int, arrays: ArrayRecord) -> MetricRecord:
            if flower_round == 0 and records:  # resumed: the last round is already evaluated
                return MetricRecord({k[4:]: v for k, v in records[-1].items() if k.startswith("dev_")})
            server_round = flower_round + strategy.offset
            metrics = evaluate_state(algorithm, arrays.to_torch_state_dict())
            stats = strategy.rounds.get(server_round, {})
            previous = records[-1] if records else {"cum_bytes_up": 0, "cum_bytes_down": 0}
            now = time.perf_counter()
            record = {"round": server_round, "train_loss": stats.get("train_loss"),
                      **{f"dev_{k}": v for k, v in metrics.items()},
                      **(stats.get("extra", {}) if server_round else teacher_dev),
                      "bytes_up": stats.get("bytes_up", 0), "bytes_down": stats.get("bytes_down", 0),
                      "cum_bytes_up": previous["cum_bytes_up"] + stats.get("bytes_up", 0),
                      "cum_bytes_down": previous["cum_bytes_down"] + stats.get("bytes_down", 0),
                      "clients": stats.get("sampled", []), "accepted": stats.get("accepted", 0),
                      "dropped": stats.get("dropped", []), "lr": stats.get("lr"),
                      "examples_seen": stats.get("examples_seen", 0),
                      "aggregate_seconds": stats.get("aggregate_seconds", 0.0),
                      "server_seconds": stats.get("server_seconds", 0.0),
                      "seconds": now - clock["last"], "elapsed": now - clock["start"],
                      "travelling_parameters": travelling}
            if ledger and server_round and stats.get("accepted", 0):
                record["dp_epsilon"] = ledger.release()
            clock["last"] = now
            records.append(record)
            run.append_jsonl("rounds.jsonl", record)
            save_checkpoint(run, arrays.to_torch_state_dict(), algorithm.checkpoint_state(), records)
            update(server_round)
            return MetricRecord(metrics)

        result = runner.start(grid=grid, initial_arrays=ArrayRecord(state),
                              num_rounds=settings.rounds - strategy.offset, timeout=settings.round_timeout,
                              train_config=ConfigRecord({"run-name": run.final_path.name}),
                              evaluate_fn=evaluate_fn)

    model = cached_model(algorithm, algorithm.server_settings())
    load_trainable_state(model, result.arrays.to_torch_state_dict() if len(result.arrays) else state)
    algorithm.save_model(model, run.path / "model")
    load_tokenizer(settings.model).save_pretrained(run.path / "model")
    plot_rounds(records, settings.task, run.path / "metrics.png")
    plot_partitions(partitions, run.path / "partitions.png")
    final = records[-1]
    run.write_json("summary.json", {
        "algorithm": settings.algorithm, "task": settings.task, "clients": settings.clients,
        "rounds": settings.rounds, "travelling_parameters": travelling,
        "dev": {k[4:]: v for k, v in final.items() if k.startswith("dev_")},
        "teacher_dev": {k[12:]: v for k, v in final.items() if k.startswith("teacher_dev_")} or None,
        "codec": settings.codec, "kd_placement": settings.kd_placement if algorithm.needs_teacher else None,
        "total_bytes_up": final["cum_bytes_up"], "total_bytes_down": final["cum_bytes_down"],
        "examples_seen": sum(r["examples_seen"] for r in records),
        "aggregate_seconds_per_round": sum(r["aggregate_seconds"] for r in records[1:]) / max(1, settings.rounds),
        **algorithm.summary_fields(),
        "dp_epsilon": final.get("dp_epsilon"), "dp_delta": settings.dp_delta if ledger else None,
        "seconds": final["elapsed"]})
    (run.path / CHECKPOINT).unlink()  # the final model and rounds.jsonl are saved
    path = run.finish()
    print_table(f"{settings.algorithm} on {settings.task}", [_row(r) for r in records], quiet)
    say(f"saved {path}", quiet)
    return path


def _row(record: dict) -> dict:
    """A compact console row: metrics, MB up/down this round and in total, seconds."""
    row = {"round": record["round"]}
    row.update({k[4:]: v for k, v in record.items() if k.startswith("dev_")})
    row.update({"teacher " + k[12:]: v for k, v in record.items() if k.startswith("teacher_dev_") and "loss" not in k})
    row["train_loss"] = "-" if record["train_loss"] is None else record["train_loss"]
    row["MB up"] = record["bytes_up"] / 1e6
    row["MB down"] = record["bytes_down"] / 1e6
    row["MB total"] = (record["cum_bytes_up"] + record["cum_bytes_down"]) / 1e6
    row["seconds"] = record["seconds"]
    return row


def make_server_app(settings: Settings | None = None, quiet: bool = False, outcome: dict | None = None) -> ServerApp:
    """A ServerApp using `settings`, or the run config when None (as under `flwr run`).

    `outcome["run_dir"]` receives the finished run folder (for in-process callers).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        quiet_libraries()
        path = run_server(grid, settings or Settings.from_run_config(context.run_config), quiet)
        if outcome is not None:
            outcome["run_dir"] = path

    return app


app = make_server_app()
