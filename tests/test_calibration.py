"""CCVR (`classifier-calibration ccvr`): the pooled statistics, the virtual features, the retrained
classifier, and a whole federation that calibrates after its last round."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fedtune import calibration
from fedtune.algorithms import get_algorithm
from fedtune.config import Settings
from fedtune.data import cached_task_data
from fedtune.local import cached_model, initial_state
from fedtune.models import trainable_state
from fedtune.partition import client_partitions
from fedtune.runs import read_jsonl
from fedtune.simulation import run_federated


def test_class_statistics_on_hand_made_features():
    features = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 8.0], [0.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1])
    stats = calibration.class_statistics(features, labels, num_classes=3)
    assert stats["counts"].tolist() == [3, 1, 0]
    assert torch.allclose(stats["means"][0], torch.tensor([3.0, 4.0], dtype=torch.float64))
    # unbiased covariance by hand: deviations (-2,-2), (0,-2), (2,4); sums of products / (3 - 1)
    expected = torch.tensor([[8.0, 12.0], [12.0, 24.0]], dtype=torch.float64) / 2
    assert torch.allclose(stats["covs"][0], expected)
    assert torch.equal(stats["covs"][1], torch.zeros(2, 2, dtype=torch.float64))  # one row: no spread
    assert torch.equal(stats["means"][2], torch.zeros(2, dtype=torch.float64))  # absent class


def test_pooled_statistics_equal_those_of_all_rows_together():
    torch.manual_seed(0)
    features = torch.randn(60, 5, dtype=torch.float64) * 3 + 1
    labels = torch.randint(0, 3, (60,))
    labels[:2] = 2  # class 2: rows 0, 1 and whatever else
    # uneven clients: one holds no row of class 1, one a single row of class 0
    splits = [torch.arange(0, 25), torch.arange(25, 26), torch.arange(26, 60)]
    splits[0] = splits[0][labels[splits[0]] != 1]
    parts = [calibration.class_statistics(features[i], labels[i], 3) for i in splits]
    used = torch.cat(splits)
    pooled = calibration.pooled_statistics(parts)
    for c in range(3):
        rows = features[used][labels[used] == c]
        assert pooled["counts"][c] == len(rows)
        assert torch.allclose(pooled["means"][c], rows.mean(0))
        assert torch.allclose(pooled["covs"][c], torch.cov(rows.T), atol=1e-10)


def test_a_covariance_sent_as_its_triangle_is_the_same_matrix_in_about_half_the_values():
    torch.manual_seed(0)
    features, labels = torch.randn(40, 6), torch.randint(0, 2, (40,))
    stats = {k: v.float() for k, v in calibration.class_statistics(features, labels, 3).items()}  # class 2 absent
    assert calibration.pack_statistics(stats, "full") is stats
    sent = calibration.pack_statistics(stats, "triangle")
    assert sorted(sent) == ["counts", "covs_triangle", "means"] and sent["covs_triangle"].shape == (3, 21)  # 6*7/2
    # row by row: (0,0), (0,1), ..., (0,5), (1,1), ...
    assert sent["covs_triangle"][0, :7].tolist() == [*stats["covs"][0, 0].tolist(), stats["covs"][0, 1, 1].item()]
    assert calibration.check_statistics(sent, 3, 6) is None
    back = calibration.unpack_statistics(sent, 6)
    upper = torch.triu(stats["covs"])
    assert torch.equal(back["covs"], upper + upper.transpose(1, 2) - torch.diag_embed(stats["covs"].diagonal(0, 1, 2)))
    assert torch.allclose(back["covs"], stats["covs"], atol=1e-6)  # torch.cov's two triangles agree to rounding
    assert torch.equal(back["means"], stats["means"]) and torch.equal(back["counts"], stats["counts"])
    short = {**sent, "covs_triangle": sent["covs_triangle"][:, :-1]}
    assert calibration.check_statistics(short, 3, 6) == "class statistics covs_triangle of shape (3, 20), expected (3, 21)"


def test_virtual_features_follow_the_pooled_gaussians_and_skip_absent_classes():
    mean = torch.tensor([[2.0, -1.0], [0.0, 0.0], [-3.0, 4.0]], dtype=torch.float64)
    cov = torch.stack([torch.tensor([[1.0, 0.6], [0.6, 2.0]]), torch.eye(2),
                       torch.tensor([[1.0, 1.0], [1.0, 1.0]])]).double()  # class 2: singular (rank 1)
    pooled = {"counts": torch.tensor([10.0, 0.0, 7.0], dtype=torch.float64), "means": mean, "covs": cov}
    x, y = calibration.virtual_features(pooled, 20000, torch.Generator().manual_seed(1))
    assert y.tolist().count(0) == 20000 and y.tolist().count(2) == 20000 and 1 not in y.tolist()
    for c in (0, 2):
        rows = x[y == c].double()
        assert torch.allclose(rows.mean(0), mean[c], atol=0.05)
        assert torch.allclose(torch.cov(rows.T), cov[c], atol=0.06)
    again, _ = calibration.virtual_features(pooled, 20000, torch.Generator().manual_seed(1))
    assert torch.equal(x, again)  # seeded


def test_fit_head_removes_a_classifier_bias_toward_one_class():
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(500, 4, generator=generator) + 2, torch.randn(500, 4, generator=generator) - 2])
    y = torch.cat([torch.zeros(500, dtype=torch.long), torch.ones(500, dtype=torch.long)])
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 6.0]))  # every row predicted class 1
    assert (head(x).argmax(-1) == 1).all()
    loss = calibration.fit_head(head, x, y, lr=0.05, batch_size=32, generator=generator)
    accuracy = (head(x).argmax(-1) == y).float().mean()
    assert accuracy > 0.97 and loss < 0.2


def test_discriminant_logit_differences_are_gaussian_log_density_ratios():
    """With a shared covariance the discriminant's logit_a - logit_b is log N(x; mu_a, S) - log N(x; mu_b, S)
    (torch.distributions as the reference); S is the mean of the class covariances."""
    torch.manual_seed(0)
    a = torch.randn(4, 4, dtype=torch.float64)
    cov = torch.stack([a @ a.T + torch.eye(4, dtype=torch.float64), 2 * torch.eye(4, dtype=torch.float64),
                       a @ a.T + 3 * torch.eye(4, dtype=torch.float64)])
    means = torch.randn(3, 4, dtype=torch.float64)
    pooled = {"counts": torch.tensor([5.0, 9.0, 2.0], dtype=torch.float64), "means": means, "covs": cov}
    weight, bias = calibration.discriminant_head(pooled, ridge=0.0)
    x = torch.randn(50, 4, dtype=torch.float64)
    logits = x @ weight.T + bias
    shared = cov.mean(0)
    density = torch.stack([torch.distributions.MultivariateNormal(m, shared).log_prob(x) for m in means], 1)
    for i, j in ((0, 1), (2, 1), (0, 2)):
        assert torch.allclose(logits[:, i] - logits[:, j], density[:, i] - density[:, j], atol=1e-9)
    pooled["counts"][1] = 0
    with pytest.raises(ValueError, match=r"no client holds class\(es\) \[1\]"):
        calibration.discriminant_head(pooled)


def test_the_discriminant_survives_a_float32_head_under_an_ill_conditioned_covariance():
    """Features like a trained model's: a large mean shared by the classes, covariance eigenvalues from
    1e-9 to 1e-2, the classes apart along the large ones. The head computes in float32; its logit
    difference must still be the float64 log-density ratio (the uncentered discriminant, ~3e8 per
    weight, gets half the decisions wrong here)."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    cov = q @ torch.diag(torch.logspace(-9, -2, 64, dtype=torch.float64)) @ q.T
    common, apart = torch.rand(64, dtype=torch.float64) * 2 - 1, q[:, -8:] @ torch.randn(8, dtype=torch.float64) * 0.05
    means = torch.stack([common - apart / 2, common + apart / 2])
    weight, bias = calibration.discriminant_head(
        {"counts": torch.tensor([10.0, 10.0]), "means": means, "covs": torch.stack([cov, cov])}, ridge=0.0)
    gaussians = [torch.distributions.MultivariateNormal(m, cov) for m in means]
    x = torch.cat([g.sample((500,)) for g in gaussians])
    head = nn.Linear(64, 2).requires_grad_(False)
    head.weight.copy_(weight)
    head.bias.copy_(bias)
    logits = head(x.float()).double()
    expected = gaussians[1].log_prob(x) - gaussians[0].log_prob(x)
    assert torch.allclose(logits[:, 1] - logits[:, 0], expected, atol=1e-3)


def test_head_layer_is_the_trainable_classifier(tiny_bert, glue_dir):
    settings = Settings(task="sst2", glue_dir=str(glue_dir), model=tiny_bert, train_limit=40, eval_limit=8, lora_r=2)
    algorithm = get_algorithm("fedlora", settings)
    model = cached_model(algorithm, settings)
    name, layer = calibration.head_layer(model, 2)
    assert name.endswith("classifier.modules_to_save.default") and layer.weight.requires_grad
    full = cached_model(get_algorithm("fedavg", settings.replace(algorithm="fedavg")), settings.replace(algorithm="fedavg"))
    assert calibration.head_layer(full, 2)[0] == "classifier"


def test_client_features_are_what_the_classifier_reads(tiny_bert, glue_dir):
    """The hooked features equal BERT's pooler output, computed without the hook."""
    settings = Settings(task="sst2", glue_dir=str(glue_dir), model=tiny_bert, train_limit=40, eval_limit=8, lora_r=2,
                        algorithm="fedavg", max_length=32)
    algorithm = get_algorithm("fedavg", settings)
    model = cached_model(algorithm, settings)
    rows = cached_task_data(settings).private.select(client_partitions(settings, 2)[0])
    features, labels = calibration.features_of(model, rows, settings, 2)
    assert sorted(labels.tolist()) == sorted(rows["label"])
    from fedtune.data import eval_loader, tokenize
    from fedtune.models import load_tokenizer

    tokenizer = load_tokenizer(settings.input_model)
    batch = next(iter(eval_loader(tokenize(rows, tokenizer, 32), tokenizer, 1000)))
    with torch.no_grad():
        pooled = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    assert torch.allclose(features, pooled, atol=1e-5) and torch.equal(labels, batch["labels"])


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_llama"])
def test_the_classifier_applied_to_the_features_gives_the_model_logits(model, request, glue_dir):
    """For an encoder (pooler -> classifier) and a decoder (score on every position, pooled at the
    last non-pad token), under extra padding: the features are exactly what the logits come from."""
    settings = Settings(task="sst2", glue_dir=str(glue_dir), model=request.getfixturevalue(model), train_limit=40,
                        eval_limit=8, lora_r=2, max_length=32, eval_batch_size=7)
    trained = cached_model(get_algorithm("fedlora", settings), settings)
    rows = cached_task_data(settings).private.select(range(20))
    features, labels = calibration.features_of(trained, rows, settings, 2)
    _, layer = calibration.head_layer(trained, 2)
    from fedtune.data import eval_loader, tokenize
    from fedtune.models import load_tokenizer

    tokenizer = load_tokenizer(settings.input_model)
    logits = []
    with torch.no_grad():
        for batch in eval_loader(tokenize(rows, tokenizer, 32), tokenizer, 7):
            logits.append(trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
        assert torch.allclose(layer(features), torch.cat(logits), atol=1e-5)


@pytest.fixture(scope="module")
def base(tiny_bert, glue_dir, tmp_path_factory):
    return Settings(task="sst2", glue_dir=str(glue_dir), model=tiny_bert, clients=3, rounds=2, train_limit=60,
                    eval_limit=32, batch_size=8, max_length=32, local_steps=1, lora_r=2, engine="local",
                    partition="dirichlet", dirichlet_alpha=0.1, out_dir=str(tmp_path_factory.mktemp("runs")))


@pytest.mark.slow
def test_a_calibrated_run_retrains_only_the_classifier_from_the_clients_statistics(base, evaluate_export, glue_dir):
    settings = base.replace(classifier_calibration="ccvr", ccvr_samples=200)
    plain = run_federated(base, quiet=True)
    path = run_federated(settings, quiet=True)
    summary = json.loads((path / "summary.json").read_text())
    rounds = read_jsonl(path / "rounds.jsonl")
    # the rounds are those of the same run without calibration
    assert [r["dev_accuracy"] for r in rounds] == [r["dev_accuracy"] for r in read_jsonl(plain / "rounds.jsonl")]
    calibrated = summary["calibration"]
    assert calibrated["method"] == "ccvr" and calibrated["clients"] == 3 and calibrated["dropped"] == []
    assert calibrated["dev_before"]["accuracy"] == rounds[-1]["dev_accuracy"]
    assert summary["total_bytes_up"] == rounds[-1]["cum_bytes_up"] + calibrated["bytes_up"]
    assert summary["total_bytes_down"] == rounds[-1]["cum_bytes_down"] + calibrated["bytes_down"]
    # 3 clients x (counts 2 + means 2 x 32 + covariances 2 x 32 x 32 floats) at least
    assert calibrated["bytes_up"] > 3 * 4 * (2 + 64 + 2048)

    # The saved model: the plain run's weights except the classifier, which is what `calibrate`
    # fits on the clients' statistics under the plain run's final state; those statistics pooled
    # equal the statistics of all clients' rows together.
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from fedtune.models import trainable_state

    before, after = (load_file(run / "model" / "adapter_model.safetensors") for run in (plain, path))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("classifier" in k for k in changed)
    model = cached_model(get_algorithm("fedlora", settings), settings)
    set_peft_model_state_dict(model, before)
    final = trainable_state(model)
    stats = [calibration.client_statistics(model, final, settings, p, 3, 2) for p in range(3)]
    expected, _ = calibration.calibrate(model, final, stats, settings, 2)
    set_peft_model_state_dict(model, after)
    assert all(torch.allclose(expected[k], v, atol=1e-6) for k, v in trainable_state(model).items())
    used = sorted(i for part in client_partitions(settings, 3) for i in part)
    set_peft_model_state_dict(model, before)
    direct = calibration.class_statistics(*calibration.features_of(
        model, cached_task_data(settings).private.select(used), settings, 2), 2)
    pooled = calibration.pooled_statistics(stats)
    assert torch.allclose(pooled["means"], direct["means"], atol=1e-5)
    assert torch.allclose(pooled["covs"], direct["covs"], atol=1e-5)
    # the exported, calibrated model gives the metrics the run reported, without fedtune
    assert evaluate_export(path, glue_dir)["accuracy"] == pytest.approx(summary["dev"]["accuracy"], abs=1e-9)


@pytest.mark.slow
def test_ccvr_lda_sets_the_classifier_to_the_discriminant_of_the_clients_statistics(base, tiny_llama):
    settings = base.replace(classifier_calibration="ccvr-lda")
    path = run_federated(settings, quiet=True)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["calibration"]["method"] == "ccvr-lda" and summary["calibration"]["clients"] == 3
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    model = cached_model(get_algorithm("fedlora", settings), settings)
    set_peft_model_state_dict(model, load_file(path / "model" / "adapter_model.safetensors"))
    stats = [calibration.client_statistics(model, trainable_state(model), settings, p, 3, 2) for p in range(3)]
    weight, bias = calibration.discriminant_head(calibration.pooled_statistics(stats))
    _, layer = calibration.head_layer(model, 2)
    assert torch.allclose(layer.weight, weight.float(), rtol=1e-4, atol=1e-5)
    assert torch.allclose(layer.bias, bias.float(), rtol=1e-4, atol=1e-5)
    # a head without a bias (a decoder's score) is refused before any round, leaving no run folder
    out = Path(settings.out_dir) / "llama"
    with pytest.raises(ValueError, match="ccvr-lda needs a classifier with a bias"):
        run_federated(settings.replace(model=tiny_llama, out_dir=str(out)), quiet=True)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_triangle_covariances_calibrate_the_same_head_for_fewer_bytes(base):
    full, half = (json.loads((run_federated(base.replace(classifier_calibration="ccvr-lda", ccvr_covariance=how),
                                            quiet=True) / "summary.json").read_text()) for how in ("full", "triangle"))
    for name, value in full["dev"].items():  # the calibrated model's
        assert half["dev"][name] == pytest.approx(value, abs=1e-6), name
    # 3 clients x 2 classes x (32 x 32 - 32 x 33 / 2) float32 values fewer, up to the arrays' names and shapes
    saved = full["calibration"]["bytes_up"] - half["calibration"]["bytes_up"]
    assert saved == pytest.approx(3 * 2 * (32 * 32 - 32 * 33 // 2) * 4, abs=100)
    assert half["calibration"]["bytes_down"] == full["calibration"]["bytes_down"]


def test_calibration_is_refused_where_it_would_break_a_privacy_promise(base):
    with pytest.raises(ValueError, match="classifier-calibration=ccvr needs dp-noise=0"):
        base.replace(classifier_calibration="ccvr", dp_noise=0.5)
    with pytest.raises(ValueError, match="classifier-calibration=ccvr needs dp-noise=0"):
        base.replace(classifier_calibration="ccvr", secure_aggregation="secagg+")
    with pytest.raises(ValueError, match="ccvr-samples=0"):
        base.replace(ccvr_samples=0)


def test_initial_state_has_a_classifier_to_calibrate_for_every_same_task_algorithm(base):
    for name in ("fedlora", "ffa-lora", "flexlora", "hetlora", "fedavg"):
        algorithm = get_algorithm(name, base.replace(algorithm=name))
        model = cached_model(algorithm, algorithm.server_settings())
        layer_name, _ = calibration.head_layer(model, 2)
        assert any(k.startswith(layer_name) for k in initial_state(algorithm)), name


@pytest.mark.slow
def test_calibration_over_rays_grid_equals_the_local_engines(base):
    """The statistics query goes through Flower's simulation engine (Ray actors) as through the
    in-process grid, with the same result."""
    settings = base.replace(classifier_calibration="ccvr", ccvr_samples=200)
    local = json.loads((run_federated(settings, quiet=True) / "summary.json").read_text())
    ray = json.loads((run_federated(settings.replace(engine="ray"), quiet=True) / "summary.json").read_text())
    assert ray["calibration"]["clients"] == 3
    assert ray["dev"] == pytest.approx(local["dev"], abs=1e-6)


@pytest.mark.slow
def test_a_kd_student_is_calibrated_and_its_export_gives_the_reported_metric(base, evaluate_export, glue_dir):
    """FedKDLoRA with teachers kept on the clients: the student (what travels and is exported) is
    what the clients' statistics describe and what the server calibrates."""
    settings = base.replace(algorithm="fedkdlora", kd_placement="client", teacher_epochs=0.05,
                            classifier_calibration="ccvr", ccvr_samples=200)
    path = run_federated(settings, quiet=True)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["calibration"]["clients"] == 3 and summary["calibration"]["ccvr_classes"] >= 1
    assert evaluate_export(path, glue_dir)["accuracy"] == pytest.approx(summary["dev"]["accuracy"], abs=1e-9)


def test_classifier_init_is_refused_where_it_would_break_a_privacy_promise(base):
    with pytest.raises(ValueError, match="classifier-init=lda needs dp-noise=0 and secure-aggregation=none"):
        base.replace(classifier_init="lda", dp_noise=0.5, dp_clip=1.0)


@pytest.mark.slow
def test_classifier_init_sets_the_discriminant_of_the_initial_models_statistics_before_round_1(
        base, interrupt_after_round):
    from fedtune.local import evaluate_state

    settings = base.replace(classifier_init="lda", out_dir=base.out_dir + "/init")
    plain = read_jsonl(run_federated(base.replace(out_dir=base.out_dir + "/plain"), quiet=True) / "rounds.jsonl")
    path = run_federated(settings, quiet=True)
    rounds, summary = read_jsonl(path / "rounds.jsonl"), json.loads((path / "summary.json").read_text())
    # round 0 evaluates what round 1 is sent: the initial state with the discriminant of every
    # client's per-class statistics under that state as its classifier, by hand here
    algorithm = get_algorithm("fedlora", settings)
    model = cached_model(algorithm, settings)
    start = initial_state(algorithm)
    stats = [calibration.client_statistics(model, start, settings, p, 3, 2) for p in range(3)]
    weight, bias = calibration.discriminant_head(calibration.pooled_statistics(stats))
    name, _ = calibration.head_layer(model, 2)
    expected = {k: v.clone() for k, v in start.items()}
    [w_key] = [k for k in expected if name.split("base_model.model.")[-1] in k and k.endswith("weight")]
    [b_key] = [k for k in expected if name.split("base_model.model.")[-1] in k and k.endswith("bias")]
    expected[w_key], expected[b_key] = weight.float(), bias.float()
    assert sorted(k for k in start if not torch.equal(start[k], expected[k])) == sorted([w_key, b_key])
    dev = evaluate_state(algorithm, expected, final=False)  # round 0: an evaluation along the way
    assert rounds[0]["round"] == 0 and rounds[0]["dev_loss"] == pytest.approx(dev["loss"], rel=1e-5)
    assert rounds[0]["dev_loss"] != pytest.approx(plain[0]["dev_loss"], rel=1e-3)  # the init changed something
    init = summary["classifier_init"]
    assert init["method"] == "lda" and init["clients"] == 3 and init["dropped"] == []
    assert init["bytes_up"] > 3 * 4 * (2 + 64 + 2048)  # counts, means, covariances of 32 features
    assert summary["total_bytes_up"] == rounds[-1]["cum_bytes_up"] + init["bytes_up"]
    assert summary["total_bytes_down"] == rounds[-1]["cum_bytes_down"] + init["bytes_down"]

    # interrupted after round 1 and resumed: the same rounds, and the init (not redone) still counted
    resumed_settings = settings.replace(out_dir=base.out_dir + "/init-resumed")
    interrupt_after_round(1)
    with pytest.raises(KeyboardInterrupt):
        run_federated(resumed_settings, quiet=True)
    [interrupted] = Path(resumed_settings.out_dir).glob("*.incomplete")
    resumed = run_federated(resumed_settings.replace(resume=str(interrupted)), quiet=True)
    assert [r["dev_loss"] for r in read_jsonl(resumed / "rounds.jsonl")] == [r["dev_loss"] for r in rounds]
    assert json.loads((resumed / "summary.json").read_text())["classifier_init"]["bytes_up"] == init["bytes_up"]


@pytest.mark.parametrize("text", ['{"bytes_up": "4e6", "bytes_down": 1}', '{"method": "lda"}', "[1, 2]", "{not json"])
def test_a_damaged_classifier_init_record_is_one_clear_error(tmp_path, text):
    from fedtune.server_app import read_classifier_init

    path = tmp_path / "classifier-init.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="classifier-init.json"):
        read_classifier_init(path)
    path.write_text('{"method": "lda", "bytes_up": 10, "bytes_down": 3}')
    assert read_classifier_init(path)["bytes_up"] == 10
