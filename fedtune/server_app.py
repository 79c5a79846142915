"""Flower ServerApp: handshake, Flower's round loop, per-round records, final model and plots."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtune import calibration, swa
from fedtune import checkpoint as checkpoints
from fedtune.algorithms import Algorithm, get_algorithm
from fedtune.codecs import Codec
from fedtune.comm import wire_bytes
from fedtune.config import Settings
from fedtune.console import print_table, progress_bar, quiet_libraries, say, warn
from fedtune.devices import compute
from fedtune.exports import describe
from fedtune.local import cached_model, evaluate_state, initial_state
from fedtune.metrics import learned_nothing
from fedtune.models import HUB_IDS, State, load_tokenizer, load_trainable_state
from fedtune.partition import partition_report
from fedtune.plots import plot_partitions, plot_rounds
from fedtune.privacy import PrivacyLedger, private
from fedtune.runs import RunDir, discarded_on_error, read_config
from fedtune.strategy import FedTuneStrategy, RoundStats
from fedtune.tasks import task_spec
from fedtune.teacher import pretrain_teacher, teacher_metrics

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


def resumable_run(settings: Settings) -> tuple[RunDir, checkpoints.Checkpoint]:
    """The interrupted run `settings.resume` names and its last checkpoint, checked: the checkpoint
    reads as data and was written under the same settings. Writes nothing."""
    run = RunDir.reopen(settings.resume)
    try:
        checkpoint = checkpoints.load(run.path)
        saved = read_config(run.path / "config.json")
        differ = [k for k, v in settings.to_dict().items() if k != "resume" and saved.get(k) != v]
        if differ:
            raise ValueError(f"settings differ from the run being resumed in {', '.join(differ)}; "
                             f"resume with `fedtune resume {run.path}`, which reads its config.json")
        checkpoints.check_settings(checkpoint, settings.to_dict(), checkpoints.path_in(run.path))
    except BaseException:
        run.release()  # refused: the folder is as it was, free for another try
        raise
    return run, checkpoint


def open_run(settings: Settings) -> tuple[RunDir, checkpoints.Checkpoint | None]:
    """A new run folder, or with `resume` the interrupted one and its last checkpoint."""
    if not settings.resume:
        return RunDir(settings.out_dir, f"{settings.algorithm}-{settings.task}", settings), None
    return resumable_run(settings)


def run_server(grid: Grid, settings: Settings, quiet: bool = False) -> Path:
    """Run the whole federation (or resume it, with `resume`); returns the finished run folder."""
    algorithm = get_algorithm(settings.algorithm, settings)
    teacher_dev = pretrained_teacher_metrics(algorithm, quiet)  # before the handshake: clients may need it
    if settings.classifier_calibration != "none" or settings.classifier_init != "none":  # refuse before round 1
        calibration.check_model(cached_model(algorithm, algorithm.server_settings()), settings,
                                task_spec(settings.task).num_labels)
    nodes = handshake(grid, settings.clients, settings.round_timeout)
    run, checkpoint = open_run(settings)
    with discarded_on_error(run):  # a run that fails before its first checkpoint leaves no folder behind
        if checkpoint:
            checkpoints.check_teacher(checkpoint, teacher_dev, checkpoints.path_in(run.path))
        partitions = partition_report(settings, settings.clients)
        if ranks := algorithm.summary_fields()["client_ranks"]:  # record who trains at which LoRA rank
            for p in partitions:
                p["lora-r"] = ranks[p["partition-id"]]
        run.write_json("partitions.json", partitions)
        model = cached_model(algorithm, algorithm.server_settings())  # the server's model, for server-side hooks
        strategy, runner, ledger = build_runner(algorithm, nodes, partitions, model)
        state = initial_state(algorithm)
        if not checkpoint:  # a resumed run's checkpoint holds the initialised classifier already
            state = initialize_classifier(grid, nodes, algorithm, state, run, quiet)
        recorder = RoundRecorder(run, algorithm, strategy, ledger, teacher_dev, sum(t.numel() for t in state.values()))
        if checkpoint:
            state = recorder.resume(checkpoint, state)
            say(f"resuming {run.path} after round {strategy.offset}", quiet)
            if strategy.offset == settings.rounds:  # every round ran; writing the results failed last time
                state, averaged = recorder.final_state(state)
                state, calibrated = calibrate_classifier(grid, nodes, algorithm, state, quiet)
                return finish_run(run, algorithm, state, recorder.records, partitions, ledger is not None, quiet,
                                  calibrated, averaged)
        say(f"[bold]{settings.algorithm}[/] on {settings.task}: {settings.clients} clients, {settings.rounds} rounds, "
            f"{recorder.travelling:,} parameters travel -> {run.path}", quiet)
        with progress_bar(settings.rounds, "rounds", quiet) as update:
            recorder.on_round = update
            result = runner.start(grid=grid, initial_arrays=ArrayRecord(state),
                                  num_rounds=settings.rounds - strategy.offset, timeout=settings.round_timeout,
                                  train_config=ConfigRecord({"run-name": run.final_path.name}),
                                  evaluate_fn=recorder.evaluate)
        final_state, averaged = recorder.final_state(result.arrays.to_torch_state_dict() if len(result.arrays) else state)
        final_state, calibrated = calibrate_classifier(grid, nodes, algorithm, final_state, quiet)
        return finish_run(run, algorithm, final_state, recorder.records, partitions, ledger is not None, quiet,
                          calibrated, averaged)


def gather_class_statistics(grid: Grid, nodes: dict[int, int], algorithm: Algorithm, state: State,
                            what: str) -> tuple[list[State], dict]:
    """Every client's per-class feature statistics under `state` (`fedtune.calibration`), checked;
    (the usable ones, {"clients", "dropped", "bytes_up", "bytes_down"}). `what` names the step in
    the error raised when no client sent usable ones."""
    settings = algorithm.settings
    content = RecordDict({"arrays": ArrayRecord(state)})
    messages = [Message(content, message_type=f"{MessageType.QUERY}.{calibration.ACTION}", dst_node_id=node)
                for node in nodes.values()]
    num_labels = task_spec(settings.task).num_labels
    head = calibration.check_model(cached_model(algorithm, algorithm.server_settings()), settings, num_labels)
    stats, dropped, bytes_up = [], [], 0
    for reply in grid.send_and_receive(messages, timeout=settings.round_timeout):
        if reply.has_error():
            dropped.append(reply.error.reason[:300])
            continue
        bytes_up += wire_bytes(reply)
        received = reply.content["stats"].to_torch_state_dict() if "stats" in reply.content.array_records else {}
        if reason := calibration.check_statistics(received, num_labels, head.in_features):
            dropped.append(reason)
        else:
            stats.append(calibration.unpack_statistics(received, head.in_features))
    if not stats:
        raise RuntimeError(f"{what}: no client sent usable class statistics ({'; '.join(dropped) or 'no reply'}); "
                           f"the run is kept, resume it to retry")
    return stats, {"clients": len(stats), "dropped": dropped, "bytes_up": bytes_up,
                   "bytes_down": sum(wire_bytes(m) for m in messages)}


CLASSIFIER_INIT = "classifier-init.json"  # in the run folder: what `classifier-init` did and cost


def initialize_classifier(grid: Grid, nodes: dict[int, int], algorithm: Algorithm, state: State, run: RunDir,
                          quiet: bool) -> State:
    """`classifier-init lda` before round 1: every client returns its per-class feature statistics
    under the initial `state`, and the server sets the classifier to the discriminant of the pooled
    class Gaussians (as `ccvr-lda` does after the last round), so that no round starts from a
    random head. What it cost is kept in the run folder for the summary; `state` when off."""
    settings = algorithm.settings
    if settings.classifier_init == "none":
        return state
    start = time.perf_counter()
    stats, record = gather_class_statistics(grid, nodes, algorithm, state, "classifier-init lda")
    model = cached_model(algorithm, algorithm.server_settings())
    initialized, _ = calibration.calibrate(model, state, stats, settings, task_spec(settings.task).num_labels,
                                           method="ccvr-lda")
    run.write_json(CLASSIFIER_INIT, {"method": settings.classifier_init, **record,
                                     "seconds": time.perf_counter() - start})
    say(f"classifier-init {settings.classifier_init}: classifier set from {len(stats)} clients' statistics", quiet)
    return initialized


def read_classifier_init(path: Path) -> dict:
    """What `initialize_classifier` recorded, read back as data; one clear error if it is damaged."""
    record = read_config(path)
    if not all(isinstance(record.get(k), int) and record[k] >= 0 for k in ("bytes_up", "bytes_down")):
        raise ValueError(f"{path} has no byte counts (bytes_up, bytes_down as whole numbers); it is damaged: "
                         f"start the run anew")
    return record


def calibrate_classifier(grid: Grid, nodes: dict[int, int], algorithm: Algorithm, state: State,
                         quiet: bool) -> tuple[State, dict | None]:
    """`classifier-calibration ccvr` (or `ccvr-lda`) after the last round (`fedtune.calibration`): every client
    returns its per-class feature statistics under the final `state`, the server retrains the
    classifier. (calibrated state, what it did and cost), or (`state`, None) when off."""
    settings = algorithm.settings
    if settings.classifier_calibration == "none":
        return state, None
    start = time.perf_counter()
    stats, record = gather_class_statistics(grid, nodes, algorithm, state,
                                            f"classifier-calibration {settings.classifier_calibration}")
    model = cached_model(algorithm, algorithm.server_settings())
    calibrated, metrics = calibration.calibrate(model, state, stats, settings, task_spec(settings.task).num_labels)
    dev = evaluate_state(algorithm, calibrated)
    say(f"{settings.classifier_calibration}: classifier recalibrated from {len(stats)} clients' statistics", quiet)
    return calibrated, {"method": settings.classifier_calibration, **record,
                        "seconds": time.perf_counter() - start, **metrics, "dev": dev}


def pretrained_teacher_metrics(algorithm: Algorithm, quiet: bool) -> dict[str, float]:
    """Pre-train (or reuse) the teacher when the algorithm needs one; its dev metrics for round 0."""
    if not algorithm.needs_teacher:
        return {}
    teacher = pretrain_teacher(algorithm.settings, quiet)
    return {f"teacher_dev_{k}": v for k, v in teacher_metrics(teacher).items()}


def build_runner(algorithm: Algorithm, nodes: dict[int, int], partitions: list[dict], model=None):
    """(strategy, what runs the rounds: the strategy or its DP wrapper, DP ledger or None)."""
    settings = algorithm.settings
    codec = Codec(settings.codec, settings.svd_energy_start, settings.svd_energy_end, settings.rounds)
    secagg = ((settings.secagg_clip, max(p["size"] for p in partitions))
              if settings.secure_aggregation == "secagg+" else None)
    strategy = FedTuneStrategy(algorithm, nodes, settings.fraction_train, settings.seed, algorithm.round_lr, codec,
                               secagg, model)
    runner = private(strategy, settings)  # the DP wrapper around it, when dp-noise > 0
    ledger = PrivacyLedger(settings, len(strategy.sample(1))) if settings.dp_noise > 0 else None
    return strategy, runner, ledger


class RunFailed(RuntimeError):
    """A run stopped because its rounds kept failing (no usable client reply)."""


def failed_rounds(records: list[dict]) -> list[int]:
    """The rounds (after round 0) in which the server used no client's reply."""
    return [r["round"] for r in records[1:] if r.get("accepted", 0) == 0]


class RoundRecorder:
    """Evaluates the global model after every round (Flower's `evaluate_fn`) and writes the
    round's record to rounds.jsonl and the checkpoint."""

    def __init__(self, run: RunDir, algorithm: Algorithm, strategy: FedTuneStrategy, ledger: PrivacyLedger | None,
                 teacher_dev: dict[str, float], travelling: int):
        self.run, self.algorithm, self.strategy, self.ledger = run, algorithm, strategy, ledger
        self.teacher_dev, self.travelling = teacher_dev, travelling
        self.eval_seconds = 0.0  # the last evaluation, recorded with its round
        self.records: list[dict] = []
        self.swa: State = {}  # swa-rounds: the running mean of the global states since `swa.first_round`
        self.on_round = lambda server_round: None
        now = time.perf_counter()
        self.clock = {"last": now, "start": now}

    def resume(self, checkpoint: checkpoints.Checkpoint, initial: State) -> State:
        """Take over an interrupted run's records; the global state to continue from (checked
        against the keys and shapes of this run's `initial` state)."""
        checkpoints.check_state(checkpoint.global_state, initial, checkpoints.path_in(self.run.path))
        if checkpoint.records[-1]["round"] > self.algorithm.settings.rounds:
            raise checkpoints.CheckpointError(f"{checkpoints.path_in(self.run.path)} is after round "
                                              f"{checkpoint.records[-1]['round']} of {self.algorithm.settings.rounds}: "
                                              f"nothing is left to run")
        try:
            self.algorithm.load_saved(checkpoint.algorithm_state, self.strategy.model)
        except (KeyError, ValueError, RuntimeError, IndexError, TypeError) as err:
            raise checkpoints.CheckpointError(f"{checkpoints.path_in(self.run.path)} holds server state that "
                                              f"{self.algorithm.name} cannot restore ({err}); start the run anew") from None
        # SCAFFOLD's c exists from round 1 on (zeros until then, made when round 1 is configured).
        if self.algorithm.settings.scaffold and (checkpoint.server_state or checkpoint.records[-1]["round"] > 0):
            checkpoints.check_state(checkpoint.server_state, initial, checkpoints.path_in(self.run.path))
            self.strategy.control = checkpoint.server_state
        if self.algorithm.settings.server_momentum > 0 and checkpoint.records[-1]["round"] > 0:
            checkpoints.check_state(self.algorithm.velocity, initial, checkpoints.path_in(self.run.path))
        if checkpoint.records[-1]["round"] >= self.swa_first():
            checkpoints.check_state(checkpoint.swa_state, initial, checkpoints.path_in(self.run.path))
            self.swa = checkpoint.swa_state
        self.records = checkpoint.records
        self.run.write_jsonl("rounds.jsonl", self.records)  # drops a round that never reached its checkpoint
        self.strategy.offset = self.records[-1]["round"]
        for record in self.records:  # the privacy already spent
            if self.ledger and "dp_epsilon" in record:
                self.ledger.release()
        self.clock["start"] -= self.records[-1]["elapsed"]
        return checkpoint.global_state

    def evaluate(self, flower_round: int, arrays: ArrayRecord) -> MetricRecord:
        if flower_round == 0 and self.records:  # resumed: the last round is already evaluated
            return MetricRecord({k[4:]: v for k, v in self.records[-1].items() if k.startswith("dev_")})
        server_round = flower_round + self.strategy.offset
        state = arrays.to_torch_state_dict()
        start = time.perf_counter()
        metrics = evaluate_state(self.algorithm, state, final=server_round >= self.algorithm.settings.rounds)
        self.eval_seconds = time.perf_counter() - start
        record = self.record(server_round, metrics, self.strategy.rounds.get(server_round, RoundStats()))
        self.records.append(record)
        self.run.append_jsonl("rounds.jsonl", record)
        if server_round >= self.swa_first():
            self.swa = swa.running_mean(self.swa, state, server_round - self.swa_first() + 1)
        checkpoints.save(self.run.path, state, self.algorithm.saved_state(), self.records,
                         self.algorithm.settings.to_dict(), self.strategy.control, self.swa)
        self.on_round(server_round)
        self.stop_if_failing()
        return MetricRecord(metrics)

    def swa_first(self) -> int:
        settings = self.algorithm.settings
        return swa.first_round(settings.rounds, settings.swa_rounds)

    def final_state(self, last: State) -> tuple[State, dict | None]:
        """The run's final model: the last round's `last`, or with `swa-rounds` the mean of the
        last rounds' global states; (state, what SWA did, with its dev metrics, or None)."""
        if not self.swa:
            return last, None
        return self.swa, {"rounds": self.algorithm.settings.swa_rounds, "dev": evaluate_state(self.algorithm, self.swa)}

    def stop_if_failing(self) -> None:
        """Stop the run (its .incomplete folder and checkpoint kept) when more than `max-failed-rounds`
        rounds, or every round of the run, had no usable client reply: it would finish looking like a
        result while the global model never changed in those rounds."""
        failed = failed_rounds(self.records)
        limit = self.algorithm.settings.max_failed_rounds
        if failed and (len(failed) > limit or len(failed) == self.algorithm.settings.rounds):
            last = self.records[-1]
            reasons = sorted({d["reason"] for d in last["dropped"]}) or ["no reply"]
            raise RunFailed(f"{len(failed)} of {len(self.records) - 1} rounds had no usable client reply "
                            f"(max-failed-rounds={limit}; round {last['round']}: {'; '.join(reasons)[:300]}); "
                            f"the run is stopped and kept for inspection in {self.run.path}")

    def record(self, server_round: int, metrics: dict[str, float], stats: RoundStats) -> dict:
        """One line of rounds.jsonl."""
        previous = self.records[-1] if self.records else {"cum_bytes_up": 0, "cum_bytes_down": 0}
        now = time.perf_counter()
        record = {"round": server_round, "train_loss": stats.train_loss,
                  **{f"dev_{k}": v for k, v in metrics.items()},
                  **(stats.extra if server_round else self.teacher_dev),
                  "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down,
                  "cum_bytes_up": previous["cum_bytes_up"] + stats.bytes_up,
                  "cum_bytes_down": previous["cum_bytes_down"] + stats.bytes_down,
                  "clients": stats.sampled, "accepted": stats.accepted, "dropped": stats.dropped, "lr": stats.lr,
                  "examples_seen": stats.examples_seen, "aggregate_seconds": stats.aggregate_seconds,
                  "server_seconds": stats.server_seconds, "client_train_seconds": stats.client_train_seconds,
                  "eval_seconds": self.eval_seconds, "seconds": now - self.clock["last"],
                  "elapsed": now - self.clock["start"], "travelling_parameters": self.travelling}
        if self.ledger and server_round and stats.accepted:
            record["dp_epsilon"] = self.ledger.release()
        self.clock["last"] = now
        return record


def finish_run(run: RunDir, algorithm: Algorithm, state: State, records: list[dict], partitions: list[dict],
               private_run: bool, quiet: bool, calibrated: dict | None = None, averaged: dict | None = None) -> Path:
    """Save the final model, plots and summary.json; rename the run folder to its final name.
    With `averaged` (swa-rounds), the summary's dev metrics are the averaged model's and the last
    round's own are under `swa.dev_last_round` (the calibration, when on, acts on the averaged model).
    With `calibrated` (the classifier retrained after the last round), the summary's dev metrics
    and total bytes are the calibrated model's and include the calibration's messages; the
    last round's own metrics stay in rounds.jsonl and under `calibration.dev_before`."""
    settings = algorithm.settings
    model = cached_model(algorithm, algorithm.server_settings())
    load_trainable_state(model, state)
    final = records[-1]
    summary = {
        "algorithm": settings.algorithm, "task": settings.task, "clients": settings.clients,
        "rounds": settings.rounds, "travelling_parameters": final["travelling_parameters"],
        "dev": {k[4:]: v for k, v in final.items() if k.startswith("dev_")},
        "teacher_dev": {k[12:]: v for k, v in final.items() if k.startswith("teacher_dev_")} or None,
        "precision": compute(settings.device, settings.precision, settings.models)[1],
        "codec": settings.codec, "codec_down": settings.codec_down, "aggregation": settings.aggregation,
        "kd_placement": settings.kd_placement if algorithm.needs_teacher else None,
        "server_data": algorithm.uses_server_data, "client_loss": settings.client_loss,
        "client_weighting": settings.client_weighting,
        "total_bytes_up": final["cum_bytes_up"], "total_bytes_down": final["cum_bytes_down"],
        "examples_seen": sum(r["examples_seen"] for r in records),
        "aggregate_seconds_per_round": sum(r["aggregate_seconds"] for r in records[1:]) / max(1, settings.rounds),
        **algorithm.summary_fields(),
        "failed_rounds": len(failed_rounds(records)),
        "dp_epsilon": final.get("dp_epsilon"), "dp_delta": settings.dp_delta if private_run else None,
        "seconds": final["elapsed"], "settings": settings.non_default()}
    if (run.path / CLASSIFIER_INIT).is_file():  # the statistics sent before round 1
        summary["classifier_init"] = read_classifier_init(run.path / CLASSIFIER_INIT)
        summary["total_bytes_up"] += summary["classifier_init"]["bytes_up"]
        summary["total_bytes_down"] += summary["classifier_init"]["bytes_down"]
    if averaged:
        summary["swa"] = {"rounds": averaged["rounds"], "dev_last_round": summary["dev"]}
        summary["dev"] = averaged["dev"]
    if calibrated:
        summary["calibration"] = {**{k: v for k, v in calibrated.items() if k != "dev"}, "dev_before": summary["dev"]}
        summary["dev"] = calibrated["dev"]
        summary["total_bytes_up"] += calibrated["bytes_up"]
        summary["total_bytes_down"] += calibrated["bytes_down"]
    summary["learned_nothing"] = learned_nothing(summary["dev"])
    try:
        algorithm.save_model(model, run.path / "model")
        load_tokenizer(settings.input_model).save_pretrained(run.path / "model")
        plot_rounds(records, settings.task, run.path / "metrics.png")
        plot_partitions(partitions, run.path / "partitions.png")
        run.write_json("summary.json", summary)
        describe(run.path / "model", settings.to_dict(), summary, task_spec(settings.task).labels,
                 HUB_IDS.get(settings.input_model, settings.input_model))
    except Exception as err:  # noqa: BLE001  (a full disk: torch, tokenizers and matplotlib each raise their own)
        free = shutil.disk_usage(run.path).free / 1e6
        raise RuntimeError(f"could not write the final model, plots and summary into {run.path} ({free:.0f} MB "
                           f"free on that disk): {err}; every round is checkpointed: free some space, then "
                           f"`fedtune resume {run.path}` writes them") from None
    checkpoints.path_in(run.path).unlink()  # the final model and rounds.jsonl are saved
    path = run.finish()
    print_table(f"{settings.algorithm} on {settings.task}", [_row(r) for r in records], quiet)
    if averaged:
        say(f"the mean of the last {averaged['rounds']} rounds' models (swa-rounds): "
            f"{', '.join(f'{k} {v:.3f}' for k, v in averaged['dev'].items())}", quiet)
    if calibrated:
        say(f"after {calibrated['method']}: {', '.join(f'{k} {v:.3f}' for k, v in calibrated['dev'].items())} "
            f"({(calibrated['bytes_up'] + calibrated['bytes_down']) / 1e6:.2f} MB for the statistics)", quiet)
    if problem := summary["learned_nothing"]:
        warn(f"{settings.algorithm} on {settings.task}: {problem}")
    say(f"saved {path}", quiet)
    return path


# The console table's metric columns (rounds.jsonl has every metric): short names, 3 decimals, so
# that a CoLA run with a teacher still fits an 80-column terminal.
_CONSOLE = {"dev_loss": "loss", "dev_accuracy": "acc", "dev_mcc": "mcc", "dev_balanced_accuracy": "bal"}


def _row(record: dict) -> dict:
    """A compact console row: round, dev metrics (the teacher's primary one), train loss, MB up/down
    this round and in total, seconds."""
    row = {"round": str(record["round"])}
    row.update({short: f"{record[key]:.3f}" for key, short in _CONSOLE.items() if key in record})
    teacher = "teacher_dev_mcc" if "teacher_dev_mcc" in record else "teacher_dev_accuracy"
    if teacher in record:
        row["tchr"] = f"{record[teacher]:.3f}"
    row["train"] = "-" if record["train_loss"] is None else f"{record['train_loss']:.3f}"
    row["MB up"] = f"{record['bytes_up'] / 1e6:.2f}"
    row["MB dn"] = f"{record['bytes_down'] / 1e6:.2f}"
    row["MB all"] = f"{(record['cum_bytes_up'] + record['cum_bytes_down']) / 1e6:.1f}"
    row["s"] = f"{record['seconds']:.0f}"
    return row


def make_server_app(settings: Settings | None = None, quiet: bool = False, outcome: dict | None = None) -> ServerApp:
    """A ServerApp using `settings`, or the run config when None (as under `flwr run`).

    `outcome["run_dir"]` receives the finished run folder (for in-process callers), or
    `outcome["error"]` the error that stopped the run (Flower's simulation only logs it).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        quiet_libraries()
        try:
            path = run_server(grid, settings or Settings.from_run_config(context.run_config), quiet)
        except (ValueError, RuntimeError, FileNotFoundError) as err:
            if outcome is not None:
                outcome["error"] = err
            raise
        if outcome is not None:
            outcome["run_dir"] = path

    return app


app = make_server_app()
