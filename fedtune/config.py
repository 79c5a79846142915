"""One typed, validated settings object for every fedtune entry point.

The same kebab-case keys are used everywhere: CLI flags (`--lora-r 8`), TOML files
(`lora-r = 8`) and Flower's run config (`[tool.flwr.app.config]`). This module is the
one place where a key maps to a field.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fedtune.plugins import declared_names, declared_options

TASKS = ("cola", "sst2")
# The registered federated algorithms and client losses, read from plugins.json (generated from the
# registries) so that `--help` and the settings check need no heavy imports.
ALGORITHMS = declared_names("algorithms")
CLIENT_LOSSES = declared_names("client-losses")
CLIENT_WEIGHTINGS = ("examples", "uniform")
CENTRALIZED_METHODS = ("finetune", "lora", "kd")
PARTITIONS = ("iid", "dirichlet", "pathological")
LR_SCHEDULES = ("constant", "linear", "cosine")
CODECS = ("none", "fp16", "int8", "int8-flat", "int8-rows", "svd")
CODECS_DOWN = ("none", "fp16", "int8", "int8-flat", "int8-rows")
AGGREGATIONS = ("mean", "median", "trimmed-mean", "krum")
BATCHINGS = ("random", "by-length")
SECURE_AGGREGATIONS = ("none", "secagg+")
MAX_LORA_RANK = 1024


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, federated: bool = False,
         centralized: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "federated": federated,
                                            "centralized": centralized})


def _fed(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A setting only federated runs read (centralized runs ignore it; their cached cells do too)."""
    return _opt(default, help, choices, federated=True)


@dataclass(frozen=True)
class CoreSettings:
    """The settings every run reads; `Settings` adds the plug-ins' own (see `fedtune.plugins`)."""

    # --- data
    task: str = _opt("sst2", "GLUE task", TASKS)
    glue_dir: str = _opt("", "folder in GLUE layout (<dir>/CoLA/train.tsv); empty: $GLUE_DIR, else the HF hub")
    max_length: int = _opt(64, "truncate sentences to this many tokens")
    public_fraction: float = _opt(0.2, "share of train held out as the public slice (teacher pre-training, server-side KD)")
    train_limit: int = _opt(0, "use at most this many private train rows (0: all); for quick runs")
    eval_limit: int = _opt(0, "evaluate on at most this many dev rows (0: all)")
    holdout_fraction: float = _opt(0.0, "0: evaluate on GLUE dev; > 0: hold out this share of the private rows as "
                                   "a validation set, train without them and evaluate on them instead of dev "
                                   "(what `compare --tune` scores learning rates on: dev stays unseen)")
    # --- model
    model: str = _opt("minilm", "model: 'minilm' (bundled all-MiniLM-L6-v2), 'smollm2' (bundled "
                                "SmolLM2-135M-Instruct), a hub id, or a local folder")
    student: str = _opt("", "student model for KD ('minilm', 'smollm2', a hub id or a folder; its own tokenizer may "
                            "differ from the teacher's `model`); empty: a subset of the teacher's blocks")
    student_layers: int = _opt(0, "KD student made from the teacher (student empty): how many of its blocks it keeps "
                               "(0: half)")
    student_blocks: str = _opt("even", "which teacher blocks that student keeps: 'even' (evenly spaced, the last kept: "
                               "DistilBERT's and FedKD's map) or 'first' (the first student-layers - 1 and the last: "
                               "a contiguous run of deep blocks dropped, Gromov et al. 2024)", choices=("even", "first"))
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: float = _opt(16.0, "LoRA alpha (update scale is alpha / r)")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA input")
    lora_targets: str = _opt("", "comma-separated module names to wrap; empty: chosen per architecture")
    model_dropout: float = _opt(-1.0, "dropout inside the model (hidden states, attention, head): -1 keeps the "
                                "model's own (0.1 for all-MiniLM-L6-v2); 0 turns it off (no random masks: "
                                "faster on CPU, see the README's Benchmarks)")
    # --- local training
    lora_lr: float = _opt(1e-3, "learning rate when the base model is frozen (LoRA, FedLoRA)")
    full_lr: float = _opt(5e-5, "learning rate when every weight trains (finetune, FedAvg)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    batch_size: int = _opt(32, "training batch size")
    eval_batch_size: int = _opt(128, "evaluation batch size")
    batching: str = _opt("random", "training batches: 'random', or 'by-length' (rows of similar length together, as "
                         "transformers' group_by_length: less padding, faster)", BATCHINGS)
    lr_schedule: str = _opt("linear", "decay over steps (centralized) or over rounds (federated)", LR_SCHEDULES)
    kd_temperature: float = _opt(1.0, "softmax temperature of the distillation KL term")
    seed: int = _opt(42, "seed for data order, partitions, sampling and initialisation")
    # --- hardware
    device: str = _opt("auto", "where to compute: auto (CUDA if present, else MPS, else CPU), cpu, cuda, cuda:N or "
                       "mps; what travels and what is saved stays on the CPU")
    precision: str = _opt("auto", "training precision: auto (bf16 autocast on a CPU whose bf16 matmuls measured >= "
                          "1.5x fp32's, e.g. AMX or AVX512-BF16; fp32 elsewhere and on GPUs), fp32, bf16 (autocast) "
                          "or fp16 (autocast and a grad scaler; CUDA only); weights stay fp32, and so does a CPU run's final "
                          "evaluation (its rounds' are in this precision)",
                          ("auto", "fp32", "bf16", "fp16"))
    compile: int = _opt(0, "1: compile the model for training with torch.compile (`nn.Module.compile`: inductor, "
                        "dynamic shapes, parameter names kept); each process pays the compilation once (~40 s "
                        "for MiniLM on a CPU), its numerics differ from eager's by rounding")
    client_gpus: float = _fed(0.0, "simulation: GPU share each simulated client reserves (0.25: 4 clients share a "
                              "GPU); 0: a whole GPU when computing on CUDA, none otherwise")
    engine: str = _fed("ray", "simulation engine: ray (Flower's simulation engine, Ray actors) or local (this one "
                       "process, no Ray: the same apps through an in-process Flower Grid)", ("ray", "local"))
    client_cpus: int = _fed(0, "simulation: CPU cores each simulated client reserves (0: all, one client at a time)")
    batched_clients: str = _fed("auto", "local engine: the round's clients train in lockstep, the shared frozen base run "
                                "once over all their rows (`fedtune.lockstep`); auto: on CUDA where that is exact (LoRA "
                                "algorithms with the default local training, no dropout, no SCAFFOLD, no compile, "
                                "no SecAgg+, not fp16; a CPU gains 1.1-1.7x: give on), on: wherever it is exact (refused "
                                "elsewhere), off: one client at a time", ("auto", "on", "off"))
    # --- centralized
    method: str = _opt("lora", "centralized method", CENTRALIZED_METHODS, centralized=True)
    epochs: float = _opt(1.0, "centralized training epochs (fractions allowed)", centralized=True)
    teacher_epochs: float = _opt(1.0, "epochs of teacher pre-training on the public slice (kd)")
    # --- federated
    algorithm: str = _fed("fedlora", "federated algorithm (`fedtune algorithms` says what each does)", ALGORITHMS)
    client_loss: str = _fed("none", "the loss clients train with, against label skew: none (cross-entropy) or a "
                            "registered client loss (`fedtune algorithms` lists them)", CLIENT_LOSSES)
    client_optimizer: str = _fed("adamw", "the optimizer of each client's local training (a new one every round): "
                                 "adamw, or sgd (plain SGD, no momentum, as the clients of FedAvg's, SCAFFOLD's and "
                                 "FedLC's papers train; `compare --tune` tries about 30x AdamW's learning rates for it); "
                                 "the server's own training (server-finetune, a server teacher) stays AdamW",
                                 ("adamw", "sgd"))
    scaffold: int = _fed(0, "1: SCAFFOLD control variates (Karimireddy et al. 2020, option II) correct each "
                         "client's drift, for an algorithm whose clients send same-shape states; both variates "
                         "travel and are counted in bytes")
    scaffold_variate: str = _fed("option-ii", "how a SCAFFOLD client sets its c_i: option-ii (the paper's "
                                 "c_i - c + (x - y) / (K lr)) or mean-gradient (the mean of its raw gradients over "
                                 "its K steps: equal to option II under plain SGD, and still a gradient under AdamW, "
                                 "whose steps make option II about 1 per weight)", ("option-ii", "mean-gradient"))
    fednova: int = _fed(0, "1: FedNova's normalized averaging (Wang et al. 2020): each client's update is divided by its "
                        "local steps, the mean rescaled by the mean step count, so clients that take more steps do "
                        "not pull the global model further; for an algorithm whose server takes the mean of "
                        "same-shape states")
    server_momentum: float = _fed(0.0, "FedAvgM (Hsu et al. 2019): the server keeps a momentum of the mean update "
                                  "across rounds, v <- m v + (previous - mean), and steps previous - v (server "
                                  "learning rate 1; 0: off), for an algorithm whose clients send same-shape states")
    server_finetune_steps: int = _fed(0, "after aggregating each round, the server trains the global model this "
                                      "many steps on the public slice (labelled data the server holds): the "
                                      "baseline for what server-side data alone does (0: off)")
    classifier_calibration: str = _fed("none", "after the last round, retrain the classifier against label skew: none, "
                                       "or ccvr (Luo et al. 2021: clients send per-class feature means and "
                                       "covariances of the final model, the server retrains the classifier on "
                                       "features drawn from them; refused with DP and SecAgg+), or ccvr-lda (the "
                                       "same statistics; the classifier set to the linear discriminant of the "
                                       "pooled class Gaussians, in closed form)", ("none", "ccvr", "ccvr-lda"))
    classifier_init: str = _fed("none", "before round 1, set the classifier from the clients' per-class feature "
                                "statistics under the initial model (the head FedNCM initialises, Legate et al. "
                                "2023): none, or lda (the linear discriminant of the pooled class Gaussians, as "
                                "ccvr-lda); refused with DP and SecAgg+", ("none", "lda"))
    freeze_head: int = _fed(0, "1: clients never train the classifier (FedBABU, Oh et al. 2022): it keeps the weights "
                            "it starts with (its seeded initialisation, or classifier-init's) and only the body "
                            "learns; the head still travels, unchanged; the server may still set it (server-finetune, "
                            "classifier-calibration)")
    ccvr_covariance: str = _fed("full", "how each client sends its per-class feature covariances (ccvr, ccvr-lda, "
                                "classifier-init lda): full (D x D) or triangle (the upper triangle with the "
                                "diagonal, D(D+1)/2 values, mirrored by the server: the same symmetric matrix in "
                                "about half the bytes)", ("full", "triangle"))
    ccvr_samples: int = _fed(2000, "ccvr: virtual features drawn per class")
    ccvr_lr: float = _fed(0.01, "ccvr: AdamW learning rate of the classifier's retraining (5 epochs over the "
                          "virtual features)")
    client_weighting: str = _fed("examples", "weights of the clients' states in the server's mean: examples (each "
                                 "client's number of rows, FedAvg's) or uniform (every client the same)",
                                 CLIENT_WEIGHTINGS)
    clients: int = _fed(4, "number of clients (simulated SuperNodes)")
    rounds: int = _fed(3, "federated rounds")
    fraction_train: float = _fed(1.0, "fraction of clients sampled per round")
    local_epochs: float = _fed(1.0, "local epochs per round (ignored when local-steps > 0)")
    local_steps: int = _fed(0, "local optimizer steps per round (0: use local-epochs)")
    partition: str = _fed("iid", "how train rows are split across clients", PARTITIONS)
    dirichlet_alpha: float = _fed(0.5, "Dirichlet concentration (partition = dirichlet)")
    classes_per_client: int = _fed(1, "labels per client (partition = pathological)")
    min_partition_size: int = _fed(1, "every client gets at least this many rows")
    round_timeout: float = _fed(3600.0, "seconds the server waits for replies in a round")
    max_failed_rounds: int = _fed(2, "a run stops with an error (its .incomplete folder kept) when more rounds than "
                                  "this had no usable client reply, or when every round had none")
    aggregation: str = _fed("mean", "how the server combines client states: example-weighted mean, or a robust "
                            "rule (coordinate median, trimmed mean, Krum)", AGGREGATIONS)
    trim_fraction: float = _fed(0.2, "trimmed-mean: share of clients cut at each end, per coordinate")
    krum_malicious: int = _fed(1, "krum: number of malicious clients assumed (f)")
    dp_noise: float = _fed(0.0, "differential privacy: Gaussian noise multiplier z (> 0 turns on DP-FedAvg with "
                           "client-side clipping; noise std z * dp-clip / sampled clients)")
    dp_clip: float = _fed(1.0, "differential privacy: L2 norm each client's update is clipped to")
    dp_delta: float = _fed(1e-5, "differential privacy: delta at which epsilon is reported")
    secure_aggregation: str = _fed("none", "secagg+: clients mask their updates (Flower's SecAgg+), the server "
                                   "sees only their weighted mean", SECURE_AGGREGATIONS)
    secagg_clip: float = _fed(8.0, "secagg+: update values are clipped to +-this before quantization")
    dropout: float = _fed(0.0, "simulated fault: probability that a sampled client fails in a round")
    # --- update compression (client -> server)
    codec: str = _fed("none", "how clients encode their update: none (fp32 state), fp16, int8, int8-flat (the "
                      "same int8 in one array: less framing), int8-rows (as int8-flat, one scale per row of a matrix), "
                      "or svd (FedKD)", CODECS)
    swa_rounds: int = _fed(0, "server-side SWA (as FedSWA): the final model is the mean of the global states after "
                           "the last N rounds (0: the last round's); rounds.jsonl keeps every round's own")
    codec_down: str = _fed("none", "how the server encodes the state it sends: none (fp32), fp16, int8, int8-flat or "
                           "int8-rows; "
                           "it keeps its exact state and adds each client's change to it", CODECS_DOWN)
    svd_energy_start: float = _fed(0.95, "svd codec: energy kept in round 1")
    svd_energy_end: float = _fed(0.98, "svd codec: energy kept in the last round (linear in between)")
    resume: str = _fed("", "folder (<name>.incomplete) of an interrupted run: continue after its last checkpointed round")
    # --- output
    out_dir: str = _opt("runs", "folder under which each run writes its own folder")

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            if f.type == "float" and not math.isfinite(getattr(self, f.name)):
                problems.append(f"{key_of(f.name)}={getattr(self, f.name)} (must be a finite number)")
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                problems.append(f"{key_of(f.name)}={getattr(self, f.name)!r} (choose from: {', '.join(choices)})")
            if (option := f.metadata.get("option")) and (problem := option.problem(key_of(f.name), getattr(self, f.name))):
                problems.append(problem)
        positive = ("max_length", "lora_r", "batch_size", "eval_batch_size", "clients", "rounds", "lora_lr", "full_lr",
                    "lora_alpha", "kd_temperature", "round_timeout")
        problems += [f"{key_of(n)}={getattr(self, n)} (must be > 0)" for n in positive if not getattr(self, n) > 0]
        nonneg = ("train_limit", "eval_limit", "local_steps", "epochs", "local_epochs", "min_partition_size",
                  "teacher_epochs", "weight_decay", "max_failed_rounds", "server_finetune_steps", "student_layers")
        problems += [f"{key_of(n)}={getattr(self, n)} (must be >= 0)" for n in nonneg if not getattr(self, n) >= 0]
        if self.ccvr_samples < 1 or not self.ccvr_lr > 0:
            problems.append(f"ccvr-samples={self.ccvr_samples} and ccvr-lr={self.ccvr_lr} (must be >= 1 and > 0)")
        statistics = [f"classifier-{name}={value}" for name, value in (("calibration", self.classifier_calibration),
                                                                        ("init", self.classifier_init)) if value != "none"]
        if statistics and (self.dp_noise > 0 or self.secure_aggregation != "none"):
            problems.append(f"{' and '.join(statistics)} needs dp-noise=0 and "
                            f"secure-aggregation=none: clients send their features' per-class means and covariances "
                            f"in the clear, which the privacy guarantees would not cover")
        if self.compile not in (0, 1):
            problems.append(f"compile={self.compile} (must be 0 or 1)")
        if self.scaffold not in (0, 1):
            problems.append(f"scaffold={self.scaffold} (must be 0 or 1)")
        if self.scaffold_variate != "option-ii" and not self.scaffold:
            problems.append(f"scaffold-variate={self.scaffold_variate} sets SCAFFOLD's c_i: it needs scaffold=1")
        if self.fednova not in (0, 1):
            problems.append(f"fednova={self.fednova} (must be 0 or 1)")
        if not 0.0 <= self.server_momentum < 1.0:
            problems.append(f"server-momentum={self.server_momentum} (must be in [0, 1))")
        if self.freeze_head not in (0, 1):
            problems.append(f"freeze-head={self.freeze_head} (must be 0 or 1)")
        if self.lora_r > MAX_LORA_RANK:
            problems.append(f"lora-r={self.lora_r} (must be <= {MAX_LORA_RANK}: a rank above a layer's width adds "
                            f"nothing but memory)")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora-dropout={self.lora_dropout} (must be in [0, 1))")
        if not 0.0 <= self.public_fraction < 1.0:
            problems.append(f"public-fraction={self.public_fraction} (must be in [0, 1))")
        if not 0.0 <= self.holdout_fraction < 1.0:
            problems.append(f"holdout-fraction={self.holdout_fraction} (must be in [0, 1))")
        if not 0.0 < self.fraction_train <= 1.0:
            problems.append(f"fraction-train={self.fraction_train} (must be in (0, 1])")
        if self.dirichlet_alpha <= 0:
            problems.append(f"dirichlet-alpha={self.dirichlet_alpha} (must be > 0)")
        for name in ("svd_energy_start", "svd_energy_end"):
            if not 0.0 < getattr(self, name) <= 1.0:
                problems.append(f"{key_of(name)}={getattr(self, name)} (must be in (0, 1])")
        if not 0.0 <= self.trim_fraction < 0.5:
            problems.append(f"trim-fraction={self.trim_fraction} (must be in [0, 0.5))")
        if not (self.model_dropout == -1 or 0.0 <= self.model_dropout < 1.0):
            problems.append(f"model-dropout={self.model_dropout} (must be -1 for the model's own, or in [0, 1))")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} (must be in [0, 1))")
        if self.dp_noise < 0 or self.dp_clip <= 0 or not 0 < self.dp_delta < 1:
            problems.append("dp-noise must be >= 0, dp-clip > 0 and dp-delta in (0, 1)")
        if self.dp_noise > 0 and (self.codec != "none" or self.aggregation != "mean"):
            problems.append("dp-noise > 0 needs codec=none and aggregation=mean (clipping and noise act on plain "
                            "updates averaged with equal weights)")
        if not 0 <= self.swa_rounds <= self.rounds:
            problems.append(f"swa-rounds={self.swa_rounds} (must be in [0, rounds={self.rounds}])")
        if self.codec_down != "none" and (self.dp_noise > 0 or self.secure_aggregation != "none"):
            problems.append("codec-down needs dp-noise=0 and secure-aggregation=none (Flower's clipping and SecAgg+ "
                            "mods read the plain state the server sent)")
        if self.secure_aggregation != "none" and (self.codec != "none" or self.aggregation != "mean"
                                                  or self.dp_noise > 0 or self.secagg_clip <= 0
                                                  or self.client_weighting != "examples"):
            problems.append("secure-aggregation needs codec=none, aggregation=mean, dp-noise=0, secagg-clip > 0 and "
                            "client-weighting=examples (the server only ever sees the masked, example-weighted sum)")
        if self.client_gpus < 0 or self.client_cpus < 0:
            problems.append("client-gpus and client-cpus must be >= 0")
        if self.krum_malicious < 0:
            problems.append(f"krum-malicious={self.krum_malicious} (must be >= 0)")
        sampled = max(1, math.floor(self.fraction_train * self.clients + 1e-9))
        if self.aggregation == "krum" and sampled < 2 * self.krum_malicious + 3:
            problems.append(f"aggregation=krum needs at least 2 * krum-malicious + 3 = {2 * self.krum_malicious + 3} "
                            f"sampled clients (Blanchard et al.), this run samples {sampled}: add clients or lower "
                            f"krum-malicious")
        if self.local_steps == 0 and self.local_epochs <= 0:
            problems.append("local-epochs must be > 0 when local-steps is 0")
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: Settings | None = None) -> Settings:
        """Build from kebab-case keys (TOML, run config); unknown keys are rejected."""
        known = {key_of(f.name): f for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        updates = {known[k].name: _coerce(k, v, known[k].type) for k, v in values.items()}
        return dataclasses.replace(base or cls(), **updates)

    @classmethod
    def from_toml(cls, path: str | Path, base: Settings | None = None) -> Settings:
        """Read a TOML file of settings (top level, or under a `[fedtune]` table)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"settings file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"settings file {path} is not valid TOML: {err}") from None
        return cls.from_dict(data.get("fedtune", data), base)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> Settings:
        """Read Flower's run config (`[tool.flwr.app.config]` plus `--run-config` overrides)."""
        return cls.from_dict(dict(run_config))

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case dict, the inverse of `from_dict`."""
        return {key_of(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def non_default(self) -> dict[str, Any]:
        """The kebab-case settings that differ from the defaults (what summary.json records)."""
        defaults = Settings().to_dict()
        return {k: v for k, v in self.to_dict().items() if v != defaults[k]}

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def trained_model(self, kd: bool) -> str:
        """The model that trains and is exported, whose tokenizer reads the rows: with distillation
        (`kd`) the `student` when it is a model of its own, else `model`."""
        return self.student if kd and self.student else self.model

    @property
    def models(self) -> tuple[str, ...]:
        """Every model a run may train: the base (or teacher) and the student."""
        return tuple(m for m in (self.model, self.student) if m)

    @property
    def input_model(self) -> str:
        """`trained_model` of a federated run (fedkdlora distils)."""
        return self.trained_model(self.algorithm == "fedkdlora")

    @property
    def resolved_glue_dir(self) -> str:
        import os

        return self.glue_dir or os.environ.get("GLUE_DIR", "")


def _plugin_field(name: str, used_by: list[str], option) -> tuple[str, str, dataclasses.Field]:
    help_text = f"{', '.join(used_by)}: {option.help}"
    metadata = {"help": help_text, "choices": option.choices, "federated": True, "centralized": False,
                "option": option}
    return name, option.type, field(default=option.default, metadata=metadata)


Settings = dataclasses.make_dataclass(
    "Settings", [_plugin_field(name, used_by, option) for name, (used_by, option) in declared_options().items()],
    bases=(CoreSettings,), frozen=True,
    namespace={"__doc__": "Everything a fedtune run needs: the core settings and every plug-in's options. "
                          "Frozen, so it can key caches and be hashed."})
Settings.__module__ = __name__


def federated_only() -> tuple[str, ...]:
    """The fields only federated runs read."""
    return tuple(f.name for f in dataclasses.fields(Settings) if f.metadata["federated"])


def key_of(field_name: str) -> str:
    """Field name -> wire/config key: `lora_r` -> `lora-r`."""
    return field_name.replace("_", "-")


def help_of(field_name: str) -> str:
    f = next(f for f in dataclasses.fields(Settings) if f.name == field_name)
    return f.metadata["help"]


def _coerce(key: str, value: Any, type_name: str) -> Any:
    """Convert a TOML/CLI/run-config value to the field's type, or say why not."""
    kind = {"str": str, "int": int, "float": float}[type_name]
    if kind is str:
        return str(value)
    if isinstance(value, bool):
        raise ValueError(f"setting {key}={value!r} must be a number")
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"setting {key}={value!r} must be a{'n int' if kind is int else ' float'}") from None
    if kind is int and isinstance(value, float) and value != converted:
        raise ValueError(f"setting {key}={value!r} must be a whole number")
    return converted
