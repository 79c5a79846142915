"""FedKDLoRA: a large teacher and a small LoRA student learn from each other; only the student travels.

Two placements (`kd-placement`):
- `server`: clients train the student on their private rows; the server, which holds the
  teacher and the public slice, averages the students and then runs mutual distillation
  (teacher and student, both with LoRA) on the public slice before sending the student back.
- `client` (FedKD, Wu et al. 2022): every client keeps its own teacher across rounds and
  trains it together with the student on its private rows; only the student goes up.
The teacher is the model pre-trained on the public slice (`fedtune teacher`, cached).
"""

from __future__ import annotations

from torch import nn

from fedtune.algorithms.aggregate import State
from fedtune.algorithms.base import register
from fedtune.algorithms.fedlora import FedLoRA
from fedtune.config import Settings
from fedtune.models import add_lora
from fedtune.teacher import build_student, load_teacher, require_teacher
from fedtune.train import seed_everything


@register
class FedKDLoRA(FedLoRA):
    name = "fedkdlora"
    summary = "teacher + small LoRA student, mutual distillation (kd-placement server|client); student travels"
    needs_teacher = True

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.teacher_on_client = settings.kd_placement == "client"
        self.teacher_state: State | None = None  # the server's teacher (server placement)

    def build_model(self, settings: Settings) -> nn.Module:
        """The student: the teacher with every other block (or `student`), with LoRA."""
        teacher = load_teacher(require_teacher(settings))
        seed_everything(settings.seed)  # the same LoRA init in every process
        return add_lora(build_student(settings, teacher), settings.lora_r, settings.lora_alpha,
                        settings.lora_dropout, settings.lora_targets)

    def server_update(self, state: State, server_round: int) -> tuple[State, dict[str, float]]:
        if self.teacher_on_client:
            return state, {}
        from fedtune.local import server_distillation  # local imports the algorithm registry

        state, self.teacher_state, metrics = server_distillation(self.settings, state, self.teacher_state,
                                                                 server_round, self.round_lr(server_round))
        return state, metrics

    def checkpoint_state(self) -> State:
        return dict(self.teacher_state or {})

    def restore(self, state: State) -> None:
        self.teacher_state = dict(state) or None
