import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transformers import PreTrainedModel

from fedtune.data import make_loader, TokenizedDataset
from fedtune.metrics import classification_metrics
from fedtune.models import load_classifier, load_tokenizer, trainable_state
from fedtune.train import distillation_losses, evaluate, schedule_factor, seed_everything, steps_for, train


def test_identical_models_have_no_kl_term():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    labels = torch.tensor([0, 1])
    teacher_loss, student_loss = distillation_losses(logits, logits.clone(), labels)
    ce = F.cross_entropy(logits, labels)
    assert torch.allclose(teacher_loss, ce) and torch.allclose(student_loss, ce)


def test_kl_term_matches_a_hand_computation():
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax -> (0.75, 0.25)
    student = torch.tensor([[0.0, 0.0]])  # softmax -> (0.5, 0.5)
    labels = torch.tensor([0])
    ce_t, ce_s = -math.log(0.75), -math.log(0.5)
    kl_t_to_s = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(teacher || student)
    kl_s_to_t = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    teacher_loss, student_loss = distillation_losses(teacher, student, labels)
    assert student_loss.item() == pytest.approx(ce_s + kl_t_to_s / (ce_t + ce_s), rel=1e-5)
    assert teacher_loss.item() == pytest.approx(ce_t + kl_s_to_t / (ce_t + ce_s), rel=1e-5)


def test_a_client_loss_replaces_the_task_terms_and_the_weight_keeps_the_cross_entropy():
    """With a client's logit-adjusted loss (priors 3/4, 1/4), each task term is the adjusted one;
    the KL terms and their weight 1 / (CE_t + CE_s) keep the plain logits."""
    from fedtune.client_losses.logit_adjustment import logit_adjusted_loss

    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax (0.75, 0.25)
    student = torch.tensor([[0.0, 0.0]])  # softmax (0.5, 0.5)
    labels = torch.tensor([0])
    counts = torch.tensor([3.0, 1.0])
    ce_t, ce_s = -math.log(0.75), -math.log(0.5)
    la_t = -math.log(3 * 0.75 / (3 * 0.75 + 0.25))  # logits + log prior: e^x proportional to (2.25, 0.25)
    la_s = -math.log(0.75)  # (0.75, 0.25)
    kl_t_to_s = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl_s_to_t = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    task = lambda logits, y: logit_adjusted_loss(logits, y, counts, 1.0)  # noqa: E731
    teacher_loss, student_loss = distillation_losses(teacher, student, labels, task=task)
    assert student_loss.item() == pytest.approx(la_s + kl_t_to_s / (ce_t + ce_s), rel=1e-5)
    assert teacher_loss.item() == pytest.approx(la_t + kl_s_to_t / (ce_t + ce_s), rel=1e-5)

    # A client with one class: its adjusted loss is 0 (no gradient), the weight stays bounded.
    one_class = lambda logits, y: logit_adjusted_loss(logits, y, torch.tensor([4.0, 0.0]), 1.0)  # noqa: E731
    student = student.clone().requires_grad_()
    teacher_loss, student_loss = distillation_losses(teacher, student, labels, task=one_class)
    assert student_loss.item() == pytest.approx(kl_t_to_s / (ce_t + ce_s), rel=1e-5)
    student_loss.backward()
    assert torch.isfinite(student.grad).all()


def test_gradients_reach_both_models():
    teacher = torch.randn(4, 2, requires_grad=True)
    student = torch.randn(4, 2, requires_grad=True)
    teacher_loss, student_loss = distillation_losses(teacher, student, torch.tensor([0, 1, 1, 0]), temperature=2.0)
    (teacher_loss + student_loss).backward()
    assert teacher.grad.abs().sum() > 0 and student.grad.abs().sum() > 0


def test_schedules():
    assert [schedule_factor("linear", p) for p in (0, 0.5, 1)] == [1.0, 0.5, 0.0]
    assert schedule_factor("cosine", 0.5) == pytest.approx(0.5)
    assert schedule_factor("constant", 0.9) == 1.0
    assert steps_for(num_batches=10, epochs=1.5) == 15 and steps_for(10, 1.0, max_steps=3) == 3


def test_metrics_match_hand_values():
    labels, predictions = np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])
    # tp=1 tn=2 fp=0 fn=1: mcc = (1*2 - 0*1) / sqrt((1+0)(1+1)(2+0)(2+1)) = 2 / sqrt(12)
    metrics = classification_metrics("cola", labels, predictions)
    assert metrics["accuracy"] == 0.75
    assert metrics["mcc"] == pytest.approx(2 / math.sqrt(12))
    assert "mcc" not in classification_metrics("sst2", labels, predictions)
    assert "auc" not in metrics  # no scores given


def test_auc_matches_the_pair_count():
    # ROC-AUC = share of (positive, negative) pairs ranked right, ties counting half.
    # positives score 0.9, 0.4, 0.4; negatives 0.4, 0.1: pairs (0.9>0.4) (0.9>0.1) (0.4=0.4) (0.4>0.1)
    # (0.4=0.4) (0.4>0.1) -> (4 + 2 * 0.5) / 6
    labels, scores = np.array([1, 1, 1, 0, 0]), np.array([0.9, 0.4, 0.4, 0.4, 0.1])
    metrics = classification_metrics("cola", labels, np.zeros(5, dtype=int), scores)
    assert metrics["auc"] == pytest.approx(5 / 6)
    assert metrics["mcc"] == 0.0  # all predicted negative: MCC cannot tell this model from chance, AUC can
    assert "auc" not in classification_metrics("sst2", np.ones(3, dtype=int), np.ones(3, dtype=int), np.ones(3))


def _toy_loader(tiny_bert, seed=0):
    tokenizer = load_tokenizer(tiny_bert)
    words = ["good great fine", "bad awful poor"] * 16
    data = TokenizedDataset([tokenizer(w)["input_ids"] for w in words], [i % 2 for i in range(32)])
    return make_loader(data, tokenizer, batch_size=8, shuffle=True, seed=seed)


def test_training_learns_a_separable_toy_task(tiny_bert):
    seed_everything(0)
    model = load_classifier(tiny_bert, 2, seed=0)
    loader = _toy_loader(tiny_bert)
    before = evaluate(model, loader, "sst2")
    train(model, loader, lr=1e-3, steps=40)
    after = evaluate(model, loader, "sst2")
    assert after["loss"] < before["loss"] and after["accuracy"] == 1.0


def test_training_is_deterministic_for_a_seed(tiny_bert):
    states = []
    for _ in range(2):
        seed_everything(5)
        model = load_classifier(tiny_bert, 2, seed=5)
        train(model, _toy_loader(tiny_bert, seed=5), lr=1e-3, steps=5)
        states.append(trainable_state(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_balanced_accuracy_and_worst_class_recall_expose_a_one_class_model():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    majority = classification_metrics("sst2", labels, np.zeros(8, dtype=int))
    assert majority["accuracy"] == 0.75  # looks fine...
    assert majority["balanced_accuracy"] == 0.5 and majority["worst_class_recall"] == 0.0  # ...and is not
    mixed = classification_metrics("sst2", labels, np.array([0, 0, 0, 1, 1, 1, 1, 0]))
    assert mixed["balanced_accuracy"] == pytest.approx((3 / 6 + 1 / 2) / 2) and mixed["worst_class_recall"] == 0.5


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
def test_bf16_training_on_cpu_switches_to_eager_attention_which_computes_the_same(fixture, request):
    path = request.getfixturevalue(fixture)
    from fedtune.models import add_lora, set_attention

    batch = {"input_ids": torch.randint(1000, 2000, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    batch["attention_mask"][1, 7:] = 0  # a padded row: both implementations must mask it alike
    model = load_classifier(path, 2, seed=0, dropout=0.0).eval()
    with torch.no_grad():
        sdpa = model(**batch).logits
        set_attention(model, "eager")
        eager = model(**batch).logits
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)
    labels = torch.tensor([0, 1, 0, 1])
    data = TokenizedDataset([ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])],
                            labels.tolist())
    loader = make_loader(data, load_tokenizer(path), batch_size=4, shuffle=False)
    fp32, bf16 = (add_lora(load_classifier(path, 2, seed=0), r=2, alpha=4) for _ in range(2))
    implementations = lambda m: {x.config._attn_implementation for x in m.modules() if isinstance(x, PreTrainedModel)}  # noqa: E731
    seen = {}
    train(fp32, loader, lr=1e-3, steps=1, on_step=lambda *_: seen.setdefault("fp32", implementations(fp32)))
    train(bf16, loader, lr=1e-3, steps=1, precision="bf16",
          on_step=lambda *_: seen.setdefault("bf16", implementations(bf16)))
    assert seen == {"fp32": {"sdpa"}, "bf16": {"eager"}}  # while training
    # afterwards the model's own again, so evaluation and the export compute alike
    assert implementations(fp32) == implementations(bf16) == {"sdpa"}


@pytest.mark.slow
def test_a_compiled_model_trains_as_the_eager_one_and_keeps_its_parameter_names(tiny_bert):
    """`compile`: nn.Module.compile keeps the parameter names the travelling state is keyed by, and
    changes the numbers by rounding only (no dropout, so both see the same computation)."""
    states = []
    for compile in (False, True):
        seed_everything(5)
        model = load_classifier(tiny_bert, 2, seed=5, dropout=0.0)
        train(model, _toy_loader(tiny_bert, seed=5), lr=1e-3, steps=5, compile=compile)
        states.append(trainable_state(model))
    assert list(states[0]) == list(states[1])
    for name in states[0]:
        torch.testing.assert_close(states[1][name], states[0][name], atol=1e-4, rtol=1e-3)
    assert any(not torch.equal(states[1][n], load_classifier(tiny_bert, 2, seed=5).state_dict()[n]) for n in states[1])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_one_step_of_each_client_optimizer_equals_its_update_by_hand(weight_decay):
    """`train(optimizer=...)` on a linear model with a squared loss, whose gradient is known in
    closed form: plain SGD moves w by -lr (g + wd w); AdamW's first step is -lr g / (|g| + eps)
    (m-hat = g, v-hat = g^2) after the decoupled decay w (1 - lr wd)."""
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 2.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    batch = {"x": x, "y": y, "labels": torch.tensor([0, 1])}
    loss_fn = lambda model, b: ((model(b["x"]) - b["y"]) ** 2).sum() / 2  # noqa: E731
    lr = 0.05
    for name in ("sgd", "adamw"):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2, bias=False)
        w0 = model.weight.detach().clone()
        grad = (x @ w0.T - y).T @ x  # d/dW of 1/2 ||x W^T - y||^2
        train(model, [batch], lr=lr, steps=1, weight_decay=weight_decay, loss_fn=loss_fn, optimizer=name)
        if name == "sgd":
            expected = w0 - lr * (grad + weight_decay * w0)
        else:
            expected = w0 * (1 - lr * weight_decay) - lr * grad / (grad.abs() + 1e-8)
        assert torch.allclose(model.weight.detach(), expected, atol=1e-6), name


def test_an_unknown_optimizer_is_one_clear_error():
    from fedtune.train import make_optimizer

    with pytest.raises(ValueError, match="unknown optimizer 'adam' \\(known: adamw, sgd\\)"):
        make_optimizer("adam", [torch.nn.Parameter(torch.zeros(1))], 0.1, 0.0)


def test_adamw_is_torchs_per_tensor_adamw_to_float_rounding():
    """`make_optimizer("adamw")` runs fused; over 20 steps of random gradients on tensors of
    several shapes it stays within float rounding of torch's per-tensor loop (foreach=False)."""
    from fedtune.train import make_optimizer

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((64, 32), (32,), (3, 5, 7))]
    loop = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = make_optimizer("adamw", ours, 1e-2, 0.01)
    b = torch.optim.AdamW(loop, lr=1e-2, weight_decay=0.01, foreach=False)
    for _ in range(20):
        for p, q in zip(ours, loop):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    assert all(torch.allclose(p, q, atol=1e-6, rtol=0) for p, q in zip(ours, loop))
    assert a.defaults["fused"]  # one kernel over every tensor (the speed), not the loop
