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


def test_layer_map_of_a_student_that_keeps_the_first_blocks():
    assert layer_map(30, 10, "first") == [(i, i) for i in range(9)] + [(9, 29)]
    assert layer_map(4, 2, "first") == [(0, 0), (1, 3)]


def test_hidden_mse_pairs_the_blocks_a_first_student_kept(batch):
    teacher, student = tiny(), tiny(layers=2, seed=5)
    distiller = MutualDistillation(teacher, student, hidden_weight=1.0, blocks="first").eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    t = teacher(**inputs, output_hidden_states=True).hidden_states
    s = student(**inputs, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()  # student block 0 -> teacher block 0, block 1 -> the last (3)
    expected = (((s[1] - t[1])[mask] ** 2).mean() + ((s[2] - t[4])[mask] ** 2).mean()) / 2
    assert distiller.hidden_mse(t, s, batch["attention_mask"]).item() == pytest.approx(expected.item(), rel=1e-5)


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


def _paired_batch(teacher_dir, student_dir):
    from datasets import Dataset

    from fedtune.config import Settings
    from fedtune.data import train_loader
    from fedtune.models import load_tokenizer

    rows = Dataset.from_dict({"sentence": ["the cat sat on the mat", "a dog", "colourless green ideas sleep"],
                              "label": [1, 0, 1]})
    settings = Settings(batch_size=3, max_length=64)  # no truncation: the byte-level teacher reads ~30 ids
    loader = train_loader(rows, load_tokenizer(student_dir), settings, seed=0, teacher_tokenizer=load_tokenizer(teacher_dir))
    return next(iter(loader)), rows


def test_a_paired_batch_holds_each_models_reading_of_the_same_rows(tiny_smollm, tiny_bert):
    from fedtune.models import load_tokenizer

    batch, rows = _paired_batch(tiny_smollm, tiny_bert)
    student_tok, teacher_tok = load_tokenizer(tiny_bert), load_tokenizer(tiny_smollm)
    squash = lambda text: "".join(text.split()).lower()  # noqa: E731  (BERT lowercases and splits words)
    for row in range(3):
        s_ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        t_ids = batch["teacher_input_ids"][row][batch["teacher_attention_mask"][row].bool()].tolist()
        student_text = squash(student_tok.decode(s_ids, skip_special_tokens=True))
        assert student_text == squash(teacher_tok.decode(t_ids, skip_special_tokens=True))
        label = rows["label"][[squash(s) for s in rows["sentence"]].index(student_text)]
        assert batch["labels"][row].item() == label
    assert batch["teacher_input_ids"].shape != batch["input_ids"].shape  # byte-level ids vs word pieces
    assert (batch["teacher_input_ids"][batch["teacher_attention_mask"] == 0] == teacher_tok.pad_token_id).all()


def test_cross_tokenizer_kd_feeds_each_model_its_own_ids_and_is_the_formula(tiny_smollm, tiny_bert):
    from fedtune.centralized import kd_loss_fn
    from fedtune.models import load_classifier
    from fedtune.train import distillation_losses

    batch, _ = _paired_batch(tiny_smollm, tiny_bert)
    teacher, student = load_classifier(tiny_smollm, 2, seed=0), load_classifier(tiny_bert, 2, seed=1)
    teacher.eval(), student.eval()
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        by_hand = distillation_losses(t_logits, s_logits, batch["labels"], 2.0)[1]
        assert torch.allclose(kd_loss_fn(teacher, 2.0)(student, batch), by_hand)
        mutual = MutualDistillation(teacher, student, temperature=2.0).eval()
        t_loss, s_loss = mutual.losses(batch)
    assert torch.allclose(s_loss, by_hand)
    # and the formula itself, for the teacher's side: CE + KL(student || teacher) / (CE_t + CE_s)
    ce_t, ce_s = F.cross_entropy(t_logits, batch["labels"]), F.cross_entropy(s_logits, batch["labels"])
    p_s, log_p_t = F.softmax(s_logits / 2, -1), F.log_softmax(t_logits / 2, -1)
    kl = (p_s * (p_s.log() - log_p_t)).sum(-1).mean()
    assert torch.allclose(t_loss, ce_t + 4 * kl / (ce_t + ce_s), atol=1e-6)


def test_hidden_state_distillation_across_tokenizers_is_refused(tiny_smollm, tiny_bert):
    from fedtune.models import load_classifier

    batch, _ = _paired_batch(tiny_smollm, tiny_bert)
    mutual = MutualDistillation(load_classifier(tiny_smollm, 2), load_classifier(tiny_bert, 2), hidden_weight=1.0)
    with pytest.raises(ValueError, match="kd-hidden-weight"):
        mutual.losses(batch)


def test_a_frozen_teacher_does_not_learn_and_the_student_loss_is_the_formula(batch):
    teacher = tiny()
    student = add_lora(tiny(layers=2, seed=3), r=2, alpha=4, targets="query,value")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = MutualDistillation(teacher, student, temperature=2.0, frozen_teacher=True)
    distiller.train()  # as `fedtune.train.train` leaves it: the teacher must still run without dropout
    student.eval()  # the student's dropout off, so the loss below is deterministic
    loss = distiller.loss(batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t_logits = teacher.eval()(**inputs).logits
        s_logits = student(**inputs).logits
    ce_t, ce_s = F.cross_entropy(t_logits, batch["labels"]), F.cross_entropy(s_logits, batch["labels"])
    p_t, log_p_s = F.softmax(t_logits / 2, -1), F.log_softmax(s_logits / 2, -1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()  # KL(teacher || student)
    assert torch.allclose(loss, ce_s + 4 * kl / (ce_t + ce_s), atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert distiller.kept_state() == {}  # nothing of the teacher's to keep between rounds

    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=1.0)
    distiller.train()
    distiller.loss(batch).backward()
    optimizer.step()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.named_parameters() if "lora_B" in n)
