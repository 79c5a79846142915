"""`client-optimizer`: clients' local training with AdamW (default) or plain SGD; the server's own
training stays AdamW. Checked on one local step from the same start and batch: plain SGD at lr 1
moves the weights by minus the gradient, g, and AdamW's first step at lr is -lr g / (|g| + eps)
(m-hat = g, v-hat = g^2), so the SGD step predicts the AdamW one."""

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
