"""Client losses against label skew: FedLC, the logit-adjusted loss, FedDecorr and MOON against the
papers' formulas on hand-made logits, counts and features, a client that lacks a class, and the
plug-in wiring."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedtune.client_losses import label_counts, losses_on_logits, reference_states, registered, task_loss
from fedtune.client_losses.feddecorr import decorrelation_loss
from fedtune.client_losses.fedlc import calibrated_logits, fedlc_loss
from fedtune.client_losses.fedrs import restricted_softmax_loss, restriction
from fedtune.client_losses.logit_adjustment import adjusted_logits, logit_adjusted_loss
from fedtune.client_losses.moon import model_contrastive_loss
from fedtune.config import Settings


def test_fedlc_shifts_each_logit_by_tau_over_the_fourth_root_of_its_count():
    logits = torch.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
    counts = torch.tensor([16.0, 1.0, 0.0])  # 16^(-1/4) = 0.5, 1^(-1/4) = 1, class 2 absent
    calibrated = calibrated_logits(logits, counts, tau=1.0)
    assert calibrated[0, :2].tolist() == [1.5, -0.5] and calibrated[0, 2].item() == float("-inf")
    loss = fedlc_loss(logits, torch.tensor([0]), counts, tau=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)))  # -log(e^1.5 / (e^1.5 + e^-0.5))
    loss.backward()
    p0 = 1 / (1 + math.exp(-2.0))
    assert torch.allclose(logits.grad, torch.tensor([[p0 - 1, 1 - p0, 0.0]]))  # the absent class: no gradient


def test_a_client_with_one_class_has_a_finite_zero_loss_and_no_gradient():
    logits = torch.tensor([[0.3, 2.0], [-1.0, 0.5]], requires_grad=True)
    counts = torch.tensor([5.0, 0.0])
    for loss_fn in (fedlc_loss, logit_adjusted_loss):
        loss = loss_fn(logits, torch.tensor([0, 0]), counts, 1.0)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and (logits.grad == 0).all()
        logits.grad = None


def test_logit_adjustment_adds_tau_log_prior_and_at_tau_1_is_the_balanced_softmax():
    counts = torch.tensor([3.0, 1.0])
    logits = torch.zeros(1, 2)
    assert torch.allclose(adjusted_logits(logits, counts, 2.0), 2.0 * torch.log(torch.tensor([[0.75, 0.25]])))
    # logits + log prior = [log .75, log .25]: p(label 1) = .25, so the loss is log 4
    assert logit_adjusted_loss(logits, torch.tensor([1]), counts, 1.0).item() == pytest.approx(math.log(4.0))
    logits = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(1))
    balanced_softmax = F.cross_entropy(logits + torch.log(counts), labels)  # Ren et al.: logits + log n_c
    assert logit_adjusted_loss(logits, labels, counts, 1.0).item() == pytest.approx(balanced_softmax.item(), abs=1e-6)


def test_fedrs_scales_each_logit_by_alpha_plus_the_rest_times_the_class_share_of_the_largest():
    counts = torch.tensor([8.0, 2.0, 0.0])  # scales: 1, .5 + .5 * 2/8 = .625, .5
    assert restriction(counts, 0.5).tolist() == [1.0, 0.625, 0.5]
    logits = torch.tensor([[2.0, 4.0, -2.0]], requires_grad=True)
    loss = restricted_softmax_loss(logits, torch.tensor([1]), counts, 0.5)  # softmax over [2, 2.5, -1], label 1
    z = [2.0, 2.5, -1.0]
    assert loss.item() == pytest.approx(-2.5 + math.log(sum(math.exp(v) for v in z)))
    loss.backward()
    p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    # d loss / d logit_c = scale_c * (p_c - 1[c = label]): the missing class still gets a gradient, halved
    assert torch.allclose(logits.grad, torch.tensor([[p[0], 0.625 * (p[1] - 1), 0.5 * p[2]]]))


def test_fedrs_at_alpha_1_is_cross_entropy_and_at_0_holds_the_missing_logit_at_0():
    logits = torch.tensor([[0.3, 2.0], [-1.0, 0.5]], requires_grad=True)
    labels = torch.tensor([0, 0])
    counts = torch.tensor([5.0, 0.0])
    assert restricted_softmax_loss(logits, labels, counts, 1.0).item() == \
        pytest.approx(F.cross_entropy(logits, labels).item())
    # alpha 0: the missing class's logit is 0 whatever the model says, so the loss is log(1 + e^-z_0)
    # and stays finite, not 0 as under FedLC; alpha in (0, 1): between plain cross-entropy and that
    expected = sum(math.log(1 + math.exp(-z)) for z in (0.3, -1.0)) / 2
    assert restricted_softmax_loss(logits, labels, counts, 0.0).item() == pytest.approx(expected)
    loss = restricted_softmax_loss(logits, labels, counts, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and (logits.grad[:, 1] > 0).all()  # the absent class is still pushed down


class _Logits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, input_ids, attention_mask):
        return type("Output", (), {"logits": self.logits[: len(input_ids)]})()


def test_task_loss_is_the_chosen_plug_in_on_the_clients_own_label_counts():
    rows = {"label": [0, 0, 0, 1]}
    assert label_counts(rows["label"], 2).tolist() == [3.0, 1.0]
    model = _Logits(torch.tensor([[0.2, -0.4], [1.0, 0.0]]))
    batch = {"input_ids": torch.zeros(2, 3), "attention_mask": torch.ones(2, 3), "labels": torch.tensor([1, 0])}
    expected = fedlc_loss(model.logits, batch["labels"], torch.tensor([3.0, 1.0]), 0.5)
    loss = task_loss(Settings(client_loss="fedlc", fedlc_tau=0.5), rows, 2)(model, batch)
    assert loss.item() == pytest.approx(expected.item())
    expected = logit_adjusted_loss(model.logits, batch["labels"], torch.tensor([3.0, 1.0]), 2.0)
    assert task_loss(Settings(client_loss="logit-adjust", la_tau=2.0), rows, 2)(model, batch).item() == \
        pytest.approx(expected.item())
    expected = restricted_softmax_loss(model.logits, batch["labels"], torch.tensor([3.0, 1.0]), 0.2)
    assert task_loss(Settings(client_loss="fedrs", fedrs_alpha=0.2), rows, 2)(model, batch).item() == \
        pytest.approx(expected.item())
    assert set(registered()) == {"none", "fedlc", "logit-adjust", "fedrs", "feddecorr", "moon"}
    assert losses_on_logits() == ["fedlc", "logit-adjust", "fedrs"]  # FedDecorr and MOON read features


def test_client_losses_are_settings_with_their_own_checked_options():
    with pytest.raises(ValueError, match=r"client-loss='focal' \(choose from: none, fedlc, logit-adjust, fedrs, feddecorr, moon\)"):
        Settings(client_loss="focal")
    with pytest.raises(ValueError, match=r"fedlc-tau=0.0 \(must be in \(0, inf\)\)"):
        Settings.from_dict({"fedlc-tau": 0})
    from fedtune.algorithms import get_algorithm

    for loss in ("fedlc", "logit-adjust", "fedrs"):  # losses on logits replace the task terms of FedKD's distillation
        get_algorithm("fedkdlora", Settings(algorithm="fedkdlora", kd_placement="client", client_loss=loss))
    for loss in ("feddecorr", "moon"):
        with pytest.raises(ValueError, match=f"client-loss {loss} reads each row's features: use one on logits"):
            get_algorithm("fedkdlora", Settings(algorithm="fedkdlora", kd_placement="client", client_loss=loss))


def test_feddecorr_is_the_mean_squared_off_diagonal_correlation_over_the_batch_size():
    # Columns: z-normalised (unbiased variance) they are [-1, 0, 1], [-1, 0, 1], [1, 0, -1], so every
    # off-diagonal entry of Z^T Z is +-2: mean of squares 4, over N = 3 rows.
    features = torch.tensor([[1.0, 2.0, -1.0], [2.0, 4.0, -2.0], [3.0, 6.0, -3.0]])
    assert decorrelation_loss(features).item() == pytest.approx(4 / 3, rel=1e-6)
    uncorrelated = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert decorrelation_loss(uncorrelated).item() == pytest.approx(0.0, abs=1e-12)
    # a one-row batch adds nothing; a feature constant over the batch stays finite
    one = torch.randn(1, 4, requires_grad=True)
    decorrelation_loss(one).backward()
    assert (one.grad == 0).all()
    constant = torch.tensor([[1.0, 0.0], [1.0, 2.0], [1.0, 5.0]], requires_grad=True)
    loss = decorrelation_loss(constant)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(constant.grad).all()


def test_feddecorr_task_loss_reads_the_classifiers_input_features():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32,
                                                     max_position_embeddings=16, num_labels=2)).eval()
    batch = {"input_ids": torch.randint(1, 50, (6, 8)), "attention_mask": torch.ones(6, 8, dtype=torch.long),
             "labels": torch.tensor([1, 1, 1, 1, 1, 1])}  # a one-class client
    settings = Settings(client_loss="feddecorr", feddecorr_beta=0.5)
    loss = task_loss(settings, {"label": [1] * 6}, 2)(model, batch)
    with torch.no_grad():
        features = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        expected = F.cross_entropy(model.classifier(features), batch["labels"]) + 0.5 * decorrelation_loss(features)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()  # the decorrelation term reaches the body
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_moon_contrast_is_the_papers_softmax_over_the_two_cosines():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    z_global = torch.tensor([[3.0, 0.0], [1.0, 1.0]])  # cosines with z: 1, 1/sqrt(2)
    z_previous = torch.tensor([[0.0, 1.0], [0.0, 5.0]])  # cosines with z: 0, 1
    row_0 = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + math.exp(0)))
    row_1 = -math.log(math.exp(2 ** -0.5 / 0.5) / (math.exp(2 ** -0.5 / 0.5) + math.exp(1 / 0.5)))
    assert model_contrastive_loss(z, z_global, z_previous, 0.5).item() == pytest.approx((row_0 + row_1) / 2, rel=1e-6)
    assert model_contrastive_loss(z, z_global, z_global, 0.5).item() == pytest.approx(math.log(2), rel=1e-6)
    first_round = model_contrastive_loss(z, z_global, None, 0.5)  # no previous model: one logit, loss 0
    first_round.backward()
    assert first_round.item() == 0.0 and (z.grad == 0).all()


def _tiny_bert(seed):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0, max_position_embeddings=16,
                                                    num_labels=2))


def test_moon_task_loss_contrasts_with_the_received_and_the_previous_model():
    model = _tiny_bert(0).train()
    batch = {"input_ids": torch.randint(1, 50, (6, 8)), "attention_mask": torch.ones(6, 8, dtype=torch.long),
             "labels": torch.tensor([1, 1, 1, 1, 1, 1])}  # a one-class client
    names = ("bert.pooler.dense.weight", "classifier.weight", "classifier.bias")
    received = {k: v.detach() + 0.3 * torch.randn_like(v) for k, v in model.named_parameters() if k in names}
    previous = {k: v.detach() - 0.3 * torch.randn_like(v) for k, v in model.named_parameters() if k in names}
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    settings = Settings(client_loss="moon", moon_mu=2.0, moon_tau=0.5)
    with reference_states(received, previous):
        loss = task_loss(settings, {"label": [1] * 6}, 2)(model, batch)

    def pooled_under(state):  # a second model holding `state`: the paper's global / previous network
        other = copy.deepcopy(model).eval()
        other.load_state_dict(state, strict=False)
        with torch.no_grad():
            return other.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output

    with torch.no_grad():
        z = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
        expected = F.cross_entropy(model.classifier(z), batch["labels"]) + 2.0 * model_contrastive_loss(
            z, pooled_under(received), pooled_under(previous), 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model.training  # the reference passes ran in eval mode and left the model as it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # ... and unchanged
    loss.backward()  # the contrast reaches the body through z
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    with reference_states(received, None):  # a client's first round: the plain cross-entropy
        first = task_loss(settings, {"label": [1] * 6}, 2)(model, batch)
    assert first.item() == pytest.approx(F.cross_entropy(model(**{k: v for k, v in batch.items() if k != "labels"})
                                                         .logits, batch["labels"]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="compares each row's features with the model the client received"):
        task_loss(settings, {"label": [1] * 6}, 2)  # built outside a client's round: one clear error


def test_moon_clients_keep_the_state_they_sent_and_start_as_plain_training(tiny_bert, glue_dir, tmp_path, monkeypatch):
    """Each client keeps, on its own disk, exactly the state it trained (with FedLoRA's example-weighted
    mean the server's state after round 2 is the mean of the two kept files); round 1 has no previous
    model, so it equals plain training; round 2 contrasts with it, so it does not."""
    from safetensors.torch import load_file

    import fedtune.checkpoint as checkpoints
    from fedtune.runs import read_jsonl
    from fedtune.simulation import run_federated

    base = Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=2, train_limit=40,
                    eval_limit=16, batch_size=8, max_length=32, local_steps=2, lora_r=2, engine="local",
                    precision="fp32", model_dropout=0.0, lora_dropout=0.0, client_loss="moon", moon_mu=5.0,
                    out_dir=str(tmp_path))
    saved = {}
    real_save = checkpoints.save

    def keep(folder, state, *args):
        saved[args[1][-1]["round"]] = {k: v.clone() for k, v in state.items()}
        real_save(folder, state, *args)

    monkeypatch.setattr(checkpoints, "save", keep)
    path = run_federated(base, quiet=True)
    sizes = [p["size"] for p in json.loads((path / "partitions.json").read_text())]
    kept = [load_file(f"{tmp_path}/client-state/{path.name}/previous/client-{p}-round-2.safetensors") for p in (0, 1)]
    for k, v in saved[2].items():
        assert torch.allclose(v, (sizes[0] * kept[0][k] + sizes[1] * kept[1][k]) / sum(sizes), atol=1e-6), k
    plain = read_jsonl(run_federated(base.replace(client_loss="none", out_dir=str(tmp_path / "plain")), quiet=True)
                       / "rounds.jsonl")
    moon = read_jsonl(path / "rounds.jsonl")
    assert moon[1]["train_loss"] == pytest.approx(plain[1]["train_loss"], rel=1e-6)
    assert moon[2]["train_loss"] != pytest.approx(plain[2]["train_loss"], rel=1e-6)
