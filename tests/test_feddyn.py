"""FedDyn: the maths against Algorithm 1 of the paper by hand, the regulariser's gradient on a
hand-made model, and a two-round, two-client run whose files (each client's g_k on its disk, the
server's state and h in the checkpoint) obey Algorithm 1; a resumed run equals the uninterrupted one."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fedtune.algorithms import get_algorithm
from fedtune.algorithms.feddyn import client_state_update, regulariser, server_state_update
from fedtune.config import Settings
from fedtune.runs import read_jsonl
from fedtune.simulation import run_federated
from tests.conftest import comparable_rounds


def test_algorithm_1_by_hand():
    kept, x = {"w": torch.tensor([1.0, -1.0])}, {"w": torch.tensor([2.0, 2.0])}
    y = {"w": torch.tensor([3.0, 0.0])}
    # g_k+ = g_k - alpha (y - x) = [1, -1] - .5 [1, -2] = [.5, 0]
    assert torch.equal(client_state_update(kept, y, x, alpha=0.5)["w"], torch.tensor([0.5, 0.0]))
    # 2 of 4 clients, their mean [3, 1] from x = [1, 1]: h+ = h - alpha/m * 2 * (mean - x)
    # = [0, 1] - .5/4 * 2 * [2, 0] = [-.5, 1]; x+ = mean - h+/alpha = [3, 1] - [-1, 2] = [4, -1]
    stepped, h = server_state_update({"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([3.0, 1.0])},
                                     {"w": torch.tensor([1.0, 1.0])}, clients_in_round=2, num_clients=4, alpha=0.5)
    assert torch.equal(h["w"], torch.tensor([-0.5, 1.0]))
    assert torch.equal(stepped["w"], torch.tensor([4.0, -1.0]))


def test_the_regulariser_gradient_is_minus_g_plus_alpha_times_the_move():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    g, x = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 3.0])
    regulariser([(w, g, x)], alpha=0.1).backward()
    # d/dw (-<g, w> + alpha/2 ||w - x||^2) = -g + alpha (w - x) = [-.5 + .1, 1 - .1]
    assert torch.allclose(w.grad, torch.tensor([-0.4, 0.9]))


@pytest.fixture(scope="module")
def base(tiny_bert, glue_dir, tmp_path_factory):
    return Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=2, train_limit=40,
                    eval_limit=16, batch_size=8, max_length=32, local_steps=2, lora_r=2, engine="local",
                    algorithm="feddyn", feddyn_alpha=0.1, precision="fp32", out_dir=str(tmp_path_factory.mktemp("runs")))


def test_two_rounds_follow_algorithm_1(base, monkeypatch, tmp_path):
    """y_k = x - (g_k+ - g_k) / alpha recovered from each client's kept g_k; then h and the next
    global state follow the server's update with the unweighted mean of the y_k."""
    import fedtune.checkpoint as checkpoints

    base = base.replace(out_dir=str(tmp_path))
    saved = {}
    real_save = checkpoints.save

    def keep(folder, state, algorithm_state, records, settings, server_state=None, *rest):
        saved[records[-1]["round"]] = ({k: v.clone() for k, v in state.items()},
                                       {k: v.clone() for k, v in algorithm_state.items()})
        real_save(folder, state, algorithm_state, records, settings, server_state, *rest)

    monkeypatch.setattr(checkpoints, "save", keep)
    path = run_federated(base, quiet=True)
    alpha, folder = base.feddyn_alpha, base.out_dir + f"/client-state/{path.name}"
    zeros = {k: torch.zeros_like(v) for k, v in saved[0][0].items()}
    g, h = {p: zeros for p in range(2)}, zeros
    for r in (1, 2):
        x = saved[r - 1][0]
        new = {p: load_file(f"{folder}/client-{p}-round-{r}.safetensors") for p in range(2)}
        y = {p: {k: x[k] - (new[p][k] - g[p][k]) / alpha for k in x} for p in range(2)}
        h = {k: h[k] - alpha / 2 * ((y[0][k] - x[k]) + (y[1][k] - x[k])) for k in x}
        for k in x:
            assert not torch.allclose(y[0][k], y[1][k]), k  # the clients moved differently
            assert torch.allclose(saved[r][1][f"h.{k}"], h[k], atol=1e-5), (r, k)
            assert torch.allclose(saved[r][0][k], (y[0][k] + y[1][k]) / 2 - h[k] / alpha, atol=1e-4), (r, k)
        g = new
    assert len(read_jsonl(path / "rounds.jsonl")) == 3


@pytest.mark.slow
def test_a_resumed_feddyn_run_equals_the_uninterrupted_one(base, resumed_run):
    reference = run_federated(base.replace(out_dir=base.out_dir + "/reference"), quiet=True)
    resumed = resumed_run(base.replace(out_dir=base.out_dir + "/resumed"), 1)
    ignored = ("seconds", "elapsed")
    assert comparable_rounds(resumed, ignored) == comparable_rounds(reference, ignored)


@pytest.mark.parametrize("changes", [{"scaffold": 1}, {"server_momentum": 0.9}, {"aggregation": "median"}])
def test_settings_that_would_change_the_mean_are_refused(changes):
    with pytest.raises(ValueError, match="feddyn corrects the server's mean"):
        get_algorithm("feddyn", Settings(algorithm="feddyn", **changes))
