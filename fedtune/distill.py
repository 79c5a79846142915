"""Mutual distillation (FedKD, Wu et al. 2022): a teacher and a student learn from each other; or,
with the teacher frozen, classic one-way distillation (Hinton et al. 2015) into the student."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedtune.models import kept_blocks
from fedtune.train import distillation_losses

TEACHER_KEYS = ("teacher_input_ids", "teacher_attention_mask")


def layer_map(teacher_layers: int, student_layers: int, blocks: str = "even") -> list[tuple[int, int]]:
    """(student block, teacher block) pairs: block i of the student to the teacher block a student
    made from the teacher keeps in its place (`models.kept_blocks`; `even`: (i+1)*T/S - 1).

    With a student that keeps every other teacher block this is i -> 2i+1, FedKD's map.
    """
    return list(enumerate(kept_blocks(teacher_layers, student_layers, blocks)))


def split_inputs(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(teacher inputs, student inputs) of a batch: the same rows, each in its own model's token ids
    when the batch carries the teacher's (`data.PairedDataset`), else the batch's ids for both."""
    student = {k: v for k, v in batch.items() if k not in TEACHER_KEYS}
    if "teacher_input_ids" not in batch:
        return student, student
    return {"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"],
            "labels": batch["labels"]}, student


class MutualDistillation(nn.Module):
    """A teacher and a student trained together; `loss(batch)` is teacher loss + student loss.

    Each model's loss is its task cross-entropy plus a KL term toward the other model's
    prediction and, when `hidden_weight` > 0, an MSE between mapped hidden states; the
    distillation terms are divided by the sum of both task losses (FedKD's adaptive
    weighting, see `distillation_losses`). When widths differ, a learned linear map takes
    student hidden states to the teacher's width.

    The trainable parameters are the teacher's and the student's (their LoRA adapters and
    heads) and the projection's, so `fedtune.train.train` can optimise all of them at once.

    With `frozen_teacher`, only the student learns: the teacher's parameters stop taking
    gradients, it runs in eval mode without autograd, and `loss` is the student's loss alone
    (the same formula, so the two modes differ only in whether the teacher moves).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, temperature: float = 1.0, hidden_weight: float = 0.0,
                 frozen_teacher: bool = False, blocks: str = "even"):
        super().__init__()
        self.teacher, self.student = teacher, student
        self.frozen_teacher = frozen_teacher
        if frozen_teacher:
            teacher.requires_grad_(False)
        self.temperature, self.hidden_weight = temperature, hidden_weight
        self.task = None  # a client's label-skew loss on (logits, labels) in place of the task terms' cross-entropy
        t_config, s_config = teacher.config, student.config
        self.layers = layer_map(t_config.num_hidden_layers, s_config.num_hidden_layers, blocks)
        widths_differ = t_config.hidden_size != s_config.hidden_size
        self.projection = (nn.Linear(s_config.hidden_size, t_config.hidden_size, bias=False)
                           if hidden_weight > 0 and widths_differ else nn.Identity())

    def losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher loss, student loss) on one batch."""
        hidden = self.hidden_weight > 0
        teacher_batch, batch = split_inputs(batch)
        if hidden and teacher_batch is not batch:
            raise ValueError("kd-hidden-weight compares hidden states token by token, which needs a student that "
                             "reads the teacher's token ids: set kd-hidden-weight 0 with a student of another tokenizer")
        if self.frozen_teacher:
            self.teacher.eval()  # no dropout in the targets; `train()` on the wrapper sets it back
            with torch.no_grad():
                teacher_out = self.teacher(**teacher_batch, output_hidden_states=hidden)
        else:
            teacher_out = self.teacher(**teacher_batch, output_hidden_states=hidden)
        student_out = self.student(**batch, output_hidden_states=hidden)
        teacher_loss, student_loss = distillation_losses(teacher_out.logits, student_out.logits, batch["labels"],
                                                         self.temperature, self.task)
        if hidden:
            ce_sum = (F.cross_entropy(teacher_out.logits, batch["labels"]) +
                      F.cross_entropy(student_out.logits, batch["labels"])).detach().clamp_min(1e-8)
            mse = self.hidden_mse(teacher_out.hidden_states, student_out.hidden_states, batch["attention_mask"])
            # Both models are pulled toward each other's hidden states, like the KL terms.
            teacher_loss = teacher_loss + self.hidden_weight * mse / ce_sum
            student_loss = student_loss + self.hidden_weight * mse / ce_sum
        return teacher_loss, student_loss

    def hidden_mse(self, teacher_hidden, student_hidden, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean over mapped layers of the per-token MSE, padding excluded.

        `*_hidden[0]` is the embedding output, so block j's output is `*_hidden[j + 1]`.
        """
        mask = attention_mask.unsqueeze(-1).to(teacher_hidden[0].dtype)
        terms = []
        for s, t in self.layers:
            diff = (self.projection(student_hidden[s + 1]) - teacher_hidden[t + 1]) ** 2
            terms.append((diff * mask).sum() / (mask.sum() * diff.shape[-1]))
        return torch.stack(terms).mean()

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        teacher_loss, student_loss = self.losses(batch)
        return student_loss if self.frozen_teacher else teacher_loss + student_loss

    def kept_state(self) -> dict[str, torch.Tensor]:
        """Trainable tensors that stay where they are (the teacher's and the projection's)."""
        return {name: p.detach().cpu().clone() for name, p in self.named_parameters()
                if p.requires_grad and not name.startswith("student.")}

    def load_kept_state(self, state: dict[str, torch.Tensor]) -> None:
        params = {name: p for name, p in self.named_parameters()
                  if p.requires_grad and not name.startswith("student.")}
        if set(params) != set(state):
            raise ValueError("kept teacher state does not match the teacher: "
                             f"missing {sorted(set(params) - set(state))[:3]}, "
                             f"unexpected {sorted(set(state) - set(params))[:3]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])
