"""`freeze-head` (FedBABU): clients train the body and never the classifier, which still travels."""

import pytest
import torch

from fedtune import calibration
from fedtune.algorithms import get_algorithm
from fedtune.config import Settings
from fedtune.grid import remedy_settings
from fedtune.local import batched_clients, cached_model, client_update, initial_state

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def base(tiny_bert, glue_dir, tmp_path_factory):
    return Settings(task="sst2", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=2, train_limit=40,
                    eval_limit=16, batch_size=8, max_length=32, local_steps=2, lora_r=2, engine="local",
                    out_dir=str(tmp_path_factory.mktemp("runs")))


def head_keys(algorithm, settings) -> list[str]:
    """The travelling keys of the classifier, found by name in the model (independently of `frozen`)."""
    name, _ = calibration.head_layer(cached_model(algorithm, settings), 2)
    short = name.split("base_model.model.")[-1]
    return sorted(k for k in initial_state(algorithm) if k.startswith(short + ".") or f".{short}." in k
                  or k.startswith(name + "."))


@pytest.mark.parametrize("algorithm_name, client_loss", [
    ("fedlora", "none"), pytest.param("fedavg", "none", marks=pytest.mark.slow),
    pytest.param("fedlora", "feddecorr", marks=pytest.mark.slow)])
def test_a_client_with_a_frozen_head_sends_it_back_unchanged_and_trains_the_rest(base, algorithm_name,
                                                                                client_loss):
    results = {}
    for freeze in (0, 1):
        settings = base.replace(algorithm=algorithm_name, client_loss=client_loss, freeze_head=freeze)
        algorithm = get_algorithm(algorithm_name, settings)
        sent = initial_state(algorithm)
        results[freeze] = sent, client_update(algorithm, 0, 2, sent, 1, 1e-2).state
        keys = head_keys(algorithm, settings)
    assert len(keys) == 2  # weight and bias
    sent, trained = results[1]
    assert set(trained) == set(sent)  # the head still travels: the state's keys are unchanged
    assert all(torch.equal(trained[k], sent[k]) for k in keys)
    assert any(not torch.equal(trained[k], sent[k]) for k in sent if k not in keys)  # the body trained
    sent, trained = results[0]
    assert all(not torch.equal(trained[k], sent[k]) for k in keys)  # without it the head trains
    model = cached_model(get_algorithm(algorithm_name, base.replace(algorithm=algorithm_name)), base)
    assert all(p.requires_grad for p in calibration.head_layer(model, 2)[1].parameters())  # trainable again


def test_frozen_heads_are_refused_by_batched_clients_and_named_as_a_remedy(base):
    algorithm = get_algorithm("fedlora", base.replace(freeze_head=1, batched_clients="on", model_dropout=0))
    with pytest.raises(ValueError, match="freeze-head=1 freezes the classifier"):
        batched_clients(algorithm)
    assert not batched_clients(get_algorithm("fedlora", base.replace(freeze_head=1, model_dropout=0)))  # auto: off
    assert remedy_settings("lda-init+freeze-head+ccvr-lda") == {"classifier_init": "lda", "freeze_head": 1,
                                                                "classifier_calibration": "ccvr-lda"}
    with pytest.raises(ValueError, match="freeze-head=2"):
        base.replace(freeze_head=2)


@pytest.mark.slow
def test_a_run_with_a_frozen_head_keeps_the_classifier_it_was_initialised_with(base):
    """Over two rounds the global classifier stays the discriminant set before round 1 (the mean
    of identical heads), while the LoRA factors move."""
    from fedtune.predict import load_export
    from fedtune.simulation import run_federated

    settings = base.replace(classifier_init="lda", freeze_head=1, partition="dirichlet", dirichlet_alpha=0.1,
                            out_dir=base.out_dir + "/frozen")
    path = run_federated(settings, quiet=True)
    algorithm = get_algorithm("fedlora", settings)
    model = cached_model(algorithm, settings)
    start = initial_state(algorithm)
    stats = [calibration.client_statistics(model, start, settings, p, 2, 2) for p in range(2)]
    weight, bias = calibration.discriminant_head(calibration.pooled_statistics(stats))
    exported, _ = load_export(path / "model")
    head = [m for n, m in exported.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features == 2
            and "lora_" not in n and "original_module" not in n][-1]
    assert torch.allclose(head.weight, weight.float(), atol=1e-6) and torch.allclose(head.bias, bias.float(), atol=1e-6)
    lora = [p for n, p in exported.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for p in lora)  # B starts at zero: the body trained
