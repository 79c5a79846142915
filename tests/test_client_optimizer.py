"""`client-optimizer`: clients' local training with AdamW (default) or plain SGD; the server's own
training stays AdamW. Checked on one local step from the same start and batch: plain SGD at lr 1
moves the weights by minus the gradient, g, and AdamW's first step at lr is -lr g / (|g| + eps)
(m-hat = g, v-hat = g^2), so the SGD step predicts the AdamW one."""

import numpy as np
import pytest
import torch

from fedtune.algorithms import get_algorithm
from fedtune.config import Settings
from fedtune.grid import remedy_settings
from fedtune.local import cached_model, client_update, initial_state

pytestmark = pytest.mark.usefixtures("task_identity")
LR = 1e-3


@pytest.fixture(scope="module")
def base(tiny_bert, glue_dir, tmp_path_factory):
    return Settings(task="sst2", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=2, train_limit=40,
                    eval_limit=16, batch_size=8, max_length=32, local_steps=1, lora_r=2, engine="local",
                    model_dropout=0.0, out_dir=str(tmp_path_factory.mktemp("runs")))


def step(sent: dict, trained: dict) -> torch.Tensor:
    return torch.cat([(trained[k] - sent[k]).flatten() for k in sorted(sent)])


def test_clients_step_with_the_optimizer_asked_and_the_server_with_adamw(base):
    steps = {}
    for name, lr in (("sgd", 1.0), ("sgd", LR), ("adamw", LR)):
        algorithm = get_algorithm("fedlora", base.replace(client_optimizer=name))
        sent = initial_state(algorithm)
        steps[name, lr] = step(sent, client_update(algorithm, 0, 2, sent, 1, lr).state)
    gradient = -steps["sgd", 1.0]
    nonzero = gradient[gradient != 0].abs()
    assert nonzero.max() / nonzero.min() > 10  # SGD's steps are as uneven as the gradient, AdamW's first are not
    assert torch.allclose(steps["sgd", LR], -LR * gradient, atol=1e-8)
    assert torch.allclose(steps["adamw", LR], -LR * gradient / (gradient.abs() + 1e-8), atol=0.02 * LR)
    # server-finetune trains the aggregate on the server's slice with AdamW, whatever the clients use:
    # its first step moves nearly every coordinate with a gradient by lr
    server = get_algorithm("fedlora", base.replace(client_optimizer="sgd", server_finetune_steps=1,
                                                         lora_lr=LR, lr_schedule="constant"))
    state = initial_state(server)
    changed, _ = server.after_aggregation(cached_model(server, server.server_settings()), state, 1, state)
    moved = step(state, changed).abs()
    moved = moved[moved > 0]
    assert moved.max() <= LR * 1.0001 and moved.median() == pytest.approx(LR, rel=0.01)


def test_plain_sgd_is_a_remedy_row_of_compare():
    assert remedy_settings("sgd+ccvr-lda") == {"client_optimizer": "sgd", "classifier_calibration": "ccvr-lda"}


@pytest.mark.slow
def test_one_local_sgd_step_per_round_is_gradient_descent_on_every_clients_rows(base, monkeypatch):
    """FedSGD (docs/label-skew.md): with one local step of plain SGD over a client's whole partition
    (one batch) and the server's mean weighted by partition sizes, round 1's global state is one
    gradient step on the mean loss over ALL clients' rows, however skewed the partitions are:
    sum_i (n_i / N) grad L_i = grad (1/N) sum_rows loss. Checked against that gradient computed
    directly on the pooled rows."""
    import fedtune.checkpoint as checkpoints
    from fedtune.data import cached_task_data, make_loader, tokenize
    from fedtune.models import load_tokenizer, load_trainable_state
    from fedtune.partition import client_partitions
    from fedtune.simulation import run_federated
    from fedtune.train import supervised_loss

    settings = base.replace(partition="dirichlet", dirichlet_alpha=0.1, rounds=1, batch_size=64, local_steps=1,
                            client_optimizer="sgd", lora_lr=0.5, lr_schedule="constant", batched_clients="off",
                            precision="fp32")
    saved = {}
    real_save = checkpoints.save

    def keep(folder, state, algorithm_state, records, *rest):
        saved[records[-1]["round"]] = {k: v.clone() for k, v in state.items()}
        real_save(folder, state, algorithm_state, records, *rest)

    monkeypatch.setattr(checkpoints, "save", keep)
    run_federated(settings, quiet=True)

    algorithm = get_algorithm("fedlora", settings)
    model = cached_model(algorithm, algorithm.client_settings(0))
    load_trainable_state(model, saved[0])
    rows = cached_task_data(settings).private
    assert len(rows) <= settings.batch_size  # the pooled batch is every client's rows at once
    shares = [np.mean(np.asarray(rows["label"])[part]) for part in client_partitions(settings, 2)]
    assert abs(shares[0] - shares[1]) > 0.5  # the clients' label shares differ: skewed
    tokenizer = load_tokenizer(settings.input_model)
    [batch] = list(make_loader(tokenize(rows, tokenizer, settings.max_length), tokenizer, 64, shuffle=False))
    model.train()
    model.zero_grad(set_to_none=True)
    supervised_loss(model, batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)  # the model is cached for later tests
    for key, start in saved[0].items():
        assert torch.allclose(saved[1][key], start - 0.5 * grads[key], rtol=0, atol=1e-7), key
    assert any(not torch.equal(saved[1][k], saved[0][k]) for k in saved[0])  # it did move
