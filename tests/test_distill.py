"""Mutual distillation: vanishing KL for identical models, gradients to both, the layer map, projections."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from fedtune.distill import MutualDistillation, layer_map
from fedtune.models import add_lora


def tiny(hidden=32, layers=4, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config)


@pytest.fixture
def batch():
    torch.manual_seed(1)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[0, 6:] = 0  # one padded row
    return {"input_ids": torch.randint(1, 100, (4, 10)), "attention_mask": mask,
            "labels": torch.tensor([0, 1, 1, 0])}


def test_layer_map_is_fedkds_2i_plus_1():
    assert layer_map(6, 3) == [(0, 1), (1, 3), (2, 5)]
    assert layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert layer_map(12, 4) == [(0, 2), (1, 5), (2, 8), (3, 11)]


def test_identical_models_leave_only_the_task_losses(batch):
    teacher = tiny()
    distiller = MutualDistillation(teacher, copy.deepcopy(teacher), temperature=2.0, hidden_weight=1.0)
    distiller.eval()  # no dropout: the two copies give identical outputs
    teacher_loss, student_loss = distiller.losses(batch)
    ce = F.cross_entropy(teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
    assert teacher_loss.item() == pytest.approx(ce.item(), abs=1e-6)  # KL and hidden MSE are both 0
    assert student_loss.item() == pytest.approx(ce.item(), abs=1e-6)


def test_gradients_reach_teacher_and_student_adapters_and_heads(batch):
    teacher = add_lora(tiny(), r=2, alpha=4, targets="query,value")
    student = add_lora(tiny(layers=2, seed=3), r=2, alpha=4, targets="query,value")
    distiller = MutualDistillation(teacher, student, hidden_weight=0.5)
    distiller.loss(batch).backward()
    for prefix in ("teacher.", "student."):
        grads = {n: p.grad for n, p in distiller.named_parameters() if p.requires_grad and n.startswith(prefix)}
        assert grads and all(g is not None for g in grads.values())
        # LoRA B starts at zero, so A's gradient is zero in step one; B's and the head's are not.
        assert any("lora_B" in n and g.abs().sum() > 0 for n, g in grads.items())
        assert any("classifier" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_a_projection_learns_when_widths_differ(batch):
    distiller = MutualDistillation(tiny(hidden=32), tiny(hidden=16, layers=2), hidden_weight=1.0)
    assert isinstance(distiller.projection, torch.nn.Linear) and distiller.projection.weight.shape == (32, 16)
    distiller.loss(batch).backward()
    assert distiller.projection.weight.grad.abs().sum() > 0
    assert "projection.weight" in distiller.kept_state()  # stays with the teacher, never travels
    assert not any(name.startswith("student.") for name in distiller.kept_state())


def test_hidden_mse_ignores_padding(batch):
    teacher, student = tiny(), tiny(layers=2, seed=5)
    distiller = MutualDistillation(teacher, student, hidden_weight=1.0).eval()
    t = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states
    s = student(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    expected = torch.stack([((s[i + 1] - t[j + 1])[mask] ** 2).mean() for i, j in layer_map(4, 2)]).mean()
    assert distiller.hidden_mse(t, s, batch["attention_mask"]).item() == pytest.approx(expected.item(), rel=1e-5)
