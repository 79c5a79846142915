"""Flower ClientApp: thin wiring around `fedtune.local.client_update`."""

from __future__ import annotations

import functools

from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedtune import calibration, fednova, scaffold
from fedtune.algorithms import Algorithm, get_algorithm
from fedtune.client_losses import client_loss_reads_references
from fedtune.client_state import load_kept, save_kept, state_folder
from fedtune.codecs import LAYOUT, Codec, decode_broadcast
from fedtune.config import Settings
from fedtune.console import quiet_libraries
from fedtune.local import cached_model, client_update, simulated_failure
from fedtune.secure import secure_aggregation_mod
from fedtune.tasks import task_spec


PREVIOUS = "previous"  # the client's folder of the state it trained last round (client-loss moon)


def node_partition(context: Context) -> tuple[int, int]:
    """(partition id, number of partitions) from the node config, or a clear error."""
    config = context.node_config
    if "partition-id" not in config or "num-partitions" not in config:
        raise ValueError("this SuperNode has no partition: start it with "
                         "--node-config 'partition-id=0 num-partitions=2' (simulation sets both)")
    return int(config["partition-id"]), int(config["num-partitions"])


def clip_when_private(msg: Message, context: Context, call_next) -> Message:
    """Flower's `fixedclipping_mod` on training messages that carry a clipping norm (DP runs)."""
    if msg.metadata.message_type == MessageType.TRAIN and KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@functools.lru_cache(maxsize=2)
def algorithm_for(settings: Settings) -> Algorithm:
    """The run's algorithm, built once per process."""
    return get_algorithm(settings.algorithm, settings)


def make_client_app(settings: Settings | None = None) -> ClientApp:
    """A ClientApp using `settings`, or the run config when None (as under `flwr run`)."""
    app = ClientApp(mods=[secure_aggregation_mod, clip_when_private])

    def settings_of(context: Context) -> Settings:
        return settings or Settings.from_run_config(context.run_config)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """Handshake: tell the server which partition this node holds."""
        partition_id, num_partitions = node_partition(context)
        metrics = MetricRecord({"partition-id": partition_id, "num-partitions": num_partitions})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    @app.query(calibration.ACTION)
    def class_statistics(msg: Message, context: Context) -> Message:
        """CCVR after the last round: this client's per-class feature statistics under the final model."""
        quiet_libraries()
        settings = settings_of(context)
        partition_id, num_partitions = node_partition(context)
        algorithm = algorithm_for(settings)
        stats = calibration.client_statistics(cached_model(algorithm, algorithm.server_settings()),
                                              msg.content["arrays"].to_torch_state_dict(), settings, partition_id,
                                              num_partitions, task_spec(settings.task).num_labels)
        stats = calibration.pack_statistics(stats, settings.ccvr_covariance)
        return Message(RecordDict({"stats": ArrayRecord(stats),
                                   "metrics": MetricRecord({"partition-id": partition_id})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        quiet_libraries()
        settings = settings_of(context)
        partition_id, num_partitions = node_partition(context)
        config = msg.content["config"]
        server_round = int(config["server-round"])
        # codec-down: the state arrives encoded (int8-flat with its layout); train from the decoded copy
        layout = dict(msg.content[LAYOUT]) if LAYOUT in msg.content.config_records else None
        received = decode_broadcast(msg.content["arrays"].to_torch_state_dict(), layout)
        extras = msg.content["extras"].to_torch_state_dict() if "extras" in msg.content.array_records else {}
        if simulated_failure(settings, server_round, partition_id):
            raise RuntimeError(f"simulated dropout of client {partition_id} in round {server_round}")
        # What this client keeps between rounds (its teacher) stays on its own disk, never in a reply.
        kept_folder = state_folder(settings.out_dir, str(config["run-name"]))
        lr = float(config["lr"])
        correction = None
        if settings.scaffold:  # SCAFFOLD: c from the server, c_i from this client's disk (zeros at first)
            c_global = msg.content[scaffold.RECORD].to_torch_state_dict()
            c_local = load_kept(kept_folder / scaffold.RECORD, partition_id, server_round) or scaffold.zeros_like(c_global)
            # mean-gradient: the hooks add up the raw gradients here
            correction = (c_local, c_global) + (({},) if settings.scaffold_variate == "mean-gradient" else ())
        # MOON: the state this client trained last round, from its own disk (None before its first)
        contrastive = client_loss_reads_references(settings)
        previous = load_kept(kept_folder / PREVIOUS, partition_id, server_round) if contrastive else None
        result = client_update(algorithm_for(settings), partition_id, num_partitions, received, server_round=server_round,
                               lr=lr, kept_state=load_kept(kept_folder, partition_id, server_round), extras=extras,
                               correction=correction, previous_state=previous)
        if result.kept_state is not None:
            save_kept(kept_folder, partition_id, server_round, result.kept_state)
        if contrastive:
            save_kept(kept_folder / PREVIOUS, partition_id, server_round, result.state)
        records = {}
        if correction:
            c_new = (scaffold.mean_gradient(correction[2], result.steps, correction[1]) if len(correction) == 3 else
                     scaffold.client_control(*correction, received, result.state, result.steps, lr))
            save_kept(kept_folder / scaffold.RECORD, partition_id, server_round, c_new)
            records[scaffold.RECORD] = ArrayRecord({k: c_new[k] - correction[0][k] for k in c_new})
        codec = Codec(settings.codec, settings.svd_energy_start, settings.svd_energy_end, settings.rounds)
        arrays = ArrayRecord(codec.encode(result.state, received, server_round))
        metrics = MetricRecord({"num-examples": result.num_examples, "examples-seen": result.examples_seen,
                                "train-loss": result.train_loss, "train-seconds": result.seconds,
                                "partition-id": partition_id, **result.metrics,
                                **({fednova.METRIC: result.steps} if settings.fednova else {})})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics, **records}), reply_to=msg)

    return app


app = make_client_app()
