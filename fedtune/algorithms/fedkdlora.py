"""FedKDLoRA: a large teacher and a small LoRA student learn from each other; only the student travels.

Two placements (`kd-placement`):
- `server`: clients train the student on their private rows; the server, which holds the
  teacher and the public slice, averages the students and then runs mutual distillation
  (teacher and student, both with LoRA) on the public slice before sending the student back.
- `client` (FedKD, Wu et al. 2022): every client keeps its own teacher across rounds and
  trains it together with the student on its private rows; only the student goes up.
The teacher is the model pre-trained on the public slice (`fedtune teacher`, cached).

`kd-mode` says who learns from whom: `mutual` (FedKD: the teacher, with its own LoRA, also learns
from the student) or `frozen-teacher` (classic distillation, Hinton et al. 2015: the pre-trained
teacher stays as it is and only the student learns, with the same student loss).
"""

from __future__ import annotations

import functools
import math

from torch import nn

from fedtune.algorithms.aggregate import State
from fedtune.algorithms.base import register
from fedtune.algorithms.fedlora import FedLoRA
from fedtune.client_losses import (client_loss_reads_features, client_loss_reads_references, logit_loss,
                                   losses_on_logits)
from fedtune.config import Settings
from fedtune.data import cached_task_data, train_loader
from fedtune.devices import compute, evaluation_precision
from fedtune.distill import MutualDistillation
from fedtune.models import add_lora, load_tokenizer, load_trainable_state, save_merged, trainable_state
from fedtune.plugins import Option
from fedtune.models import same_tokenizer
from fedtune.tasks import task_spec
from fedtune.teacher import build_student, load_teacher, require_teacher, teacher_metrics, teacher_tokenizer
from fedtune.train import (LocalWork, LogitLoss, TrainResult, dev_loader, evaluate, local_steps, round_seed,
                           seed_everything, train)


@register
class FedKDLoRA(FedLoRA):
    name = "fedkdlora"
    summary = "teacher + small LoRA student, mutual distillation (kd-placement server|client); student travels"
    needs_teacher = True
    options = {
        "kd_placement": Option("server", "where the teacher lives: 'server' (distils on the public slice after "
                               "aggregation) or 'client' (each client keeps its own teacher; FedKD)",
                               ("server", "client")),
        "kd_hidden_weight": Option(0.0, "weight of the hidden-state MSE term (teacher layer 2i+1 -> student layer i; "
                                   "needs a student that reads the teacher's tokens); 0: off", interval="[0, inf)"),
        "kd_mode": Option("mutual", "who learns from whom: 'mutual' (FedKD: the teacher, with its own LoRA, also "
                          "learns from the student) or 'frozen-teacher' (the pre-trained teacher stays fixed; only "
                          "the student distils from it)", ("mutual", "frozen-teacher")),
        "kd_server_steps": Option(0, "server-side distillation steps per round (0: as many as an average client's "
                                  "local steps)", interval="[0, inf)"),
    }
    rows = (("Fed-LoRA-KD (server teacher)", {"kd_placement": "server"}),
            ("Fed-LoRA-KD (client teachers)", {"kd_placement": "client"}))
    card = {"what trains": "LoRA student (+ a LoRA teacher on the server or each client)",
            "up (client -> server)": "student", "down (server -> client)": "student",
            "aggregation exact": "no (as fedlora)", "own rank per client": "no", "paper": "FedKD, Wu et al. 2022"}

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.teacher_on_client = settings.kd_placement == "client"
        self.teacher_state: State | None = None  # the server's teacher (server placement)

    @property
    def uses_server_data(self) -> bool:
        """Always: the server fine-tunes the teacher on its labelled public slice before round 1 (client
        teachers start from it too); with `kd-placement server` it also distils there every round."""
        return True

    def check_settings(self) -> None:
        super().check_settings()
        if self.settings.kd_placement == "client" and (client_loss_reads_features(self.settings)
                                                       or client_loss_reads_references(self.settings)):
            raise ValueError(f"fedkdlora with kd-placement=client trains with FedKD's distillation loss, whose task "
                             f"terms a client loss on logits replaces ({', '.join(losses_on_logits())}), but client-loss "
                             f"{self.settings.client_loss} reads each row's features: use one on logits, or "
                             f"kd-placement=server")
        if (self.settings.kd_hidden_weight > 0 and self.settings.student
                and not same_tokenizer(self.settings.model, self.settings.student)):
            raise ValueError(f"kd-hidden-weight compares hidden states token by token, but student "
                             f"{self.settings.student!r} reads other tokens than the teacher {self.settings.model!r}: "
                             f"set kd-hidden-weight 0 (the distillation on class probabilities works across tokenizers)")

    def build_model(self, settings: Settings) -> nn.Module:
        """The student: the teacher with every other block (or `student`), with LoRA."""
        teacher = load_teacher(require_teacher(settings))
        seed_everything(settings.seed)  # the same LoRA init in every process
        return add_lora(build_student(settings, teacher), settings.lora_r, settings.lora_alpha,
                        settings.lora_dropout, settings.lora_targets)

    @property
    def batchable(self) -> bool:
        """With the teacher on the server, clients train the student alone, as Fed-LoRA's do."""
        return not self.teacher_on_client

    def local_train(self, model: nn.Module, rows, global_state: State, *, seed: int, lr: float, steps: int,
                    kept_state: State | None, extras: State) -> LocalWork:
        """With the teacher on the client: mutual distillation of its teacher (kept from its last
        round) and the student on its rows; the teacher's dev metrics are reported."""
        if not self.teacher_on_client:
            return super().local_train(model, rows, global_state, seed=seed, lr=lr, steps=steps, kept_state=kept_state,
                                       extras=extras)
        task = logit_loss(self.settings, rows, task_spec(self.settings.task).num_labels)  # None: cross-entropy
        result, teacher, metrics = distil(self, model, rows, kept_state, seed, lr, steps, task,
                                          self.settings.client_optimizer)
        # A frozen teacher leaves nothing to keep (unless a hidden-state projection learns).
        return LocalWork(result, teacher or None, {f"teacher-dev-{k}": v for k, v in metrics.items()})

    def server_update(self, model: nn.Module, state: State, server_round: int,
                      previous: State) -> tuple[State, dict[str, float]]:
        """With the teacher on the server: mutual distillation on the public slice after averaging,
        for as many steps as an average client's local training (or `kd-server-steps`)."""
        if self.teacher_on_client:
            return state, {}
        settings = self.settings
        public = cached_task_data(settings).public
        if len(public) == 0:
            raise ValueError("kd-placement=server distils on the public slice, but public-fraction is 0")
        student = model
        load_trainable_state(student, state)
        steps = settings.kd_server_steps or local_steps(settings, math.ceil(len(cached_task_data(settings).private)
                                                                            / settings.clients))
        seed = round_seed(settings.seed, server_round, settings.clients)  # partition ids are 0..clients-1
        _, self.teacher_state, metrics = distil(self, student, public, self.teacher_state, seed,
                                                self.round_lr(server_round), steps)
        return trainable_state(student), {f"teacher_dev_{k}": v for k, v in metrics.items()}

    def save_model(self, model: nn.Module, folder) -> None:
        """The student with its LoRA merged in, as a plain model of its own depth: an adapter
        would name the teacher as its base, and loading it there silently gives a different model."""
        save_merged(model, folder)

    def checkpoint_state(self) -> State:
        return dict(self.teacher_state or {})

    def restore(self, state: State, model: nn.Module) -> None:
        self.teacher_state = dict(state) or None


@functools.lru_cache(maxsize=2)
def _distillation(settings: Settings, student: nn.Module) -> tuple[MutualDistillation, State]:
    """The pre-trained teacher with LoRA, paired with `student` (the same model object every round
    of a process); and the teacher's initial state."""
    teacher = load_teacher(require_teacher(settings))
    seed_everything(settings.seed)  # same teacher LoRA init on every process
    frozen = settings.kd_mode == "frozen-teacher"
    if not frozen:  # a frozen teacher needs no adapter
        teacher = add_lora(teacher, settings.lora_r, settings.lora_alpha, settings.lora_dropout, settings.lora_targets)
    distiller = MutualDistillation(teacher, student, settings.kd_temperature, settings.kd_hidden_weight, frozen,
                                    settings.student_blocks)
    distiller.to(compute(settings.device, settings.precision, settings.models)[0])  # the student is there already
    return distiller, distiller.kept_state()


def distil(algorithm: FedKDLoRA, student: nn.Module, rows, teacher_state: State | None, seed: int, lr: float,
           steps: int, task: LogitLoss | None = None,
           optimizer: str = "adamw") -> tuple[TrainResult, State, dict[str, float]]:
    """Mutual distillation of the teacher (from `teacher_state`, or its initial state) and
    `student` (its state already loaded) on `rows`: (train result, new teacher state, teacher dev
    metrics). `task` replaces the task terms' cross-entropy (a client's `client-loss`); `optimizer`
    is AdamW's or a client's `client-optimizer`. A frozen
    teacher (`kd-mode frozen-teacher`) is not evaluated again: its metrics are the pre-trained
    teacher's, as in round 0."""
    settings = algorithm.settings
    distiller, initial = _distillation(settings, student)
    distiller.load_kept_state(initial if teacher_state is None else teacher_state)
    distiller.task = task  # the distiller is shared by the rounds of a process: set on every call
    seed_everything(seed)
    loader = train_loader(rows, load_tokenizer(settings.input_model), settings, seed,
                          teacher_tokenizer=teacher_tokenizer(settings))
    device, precision = compute(settings.device, settings.precision, settings.models)
    result = train(distiller, loader, lr=lr, steps=steps, schedule="constant", weight_decay=settings.weight_decay,
                   loss_fn=lambda model, batch: model.loss(batch), precision=precision, optimizer=optimizer)
    if distiller.frozen_teacher:
        return result, distiller.kept_state(), teacher_metrics(require_teacher(settings))
    metrics = evaluate(distiller.teacher, dev_loader(settings, settings.model), settings.task,
                       evaluation_precision(device, precision, final=False))  # a teacher is never exported
    return result, distiller.kept_state(), metrics
