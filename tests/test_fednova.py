"""FedNova's normalized averaging: the maths against the paper's formula by hand, and a run whose
clients take different numbers of steps, whose next global state is that formula of what the
clients sent."""

import pytest
import torch

from fedtune import fednova
from fedtune.algorithms import get_algorithm
from fedtune.algorithms.aggregate import weighted_mean
from fedtune.config import Settings
from fedtune.simulation import run_federated


def test_normalized_average_by_hand():
    previous = {"w": torch.tensor([1.0, 1.0])}
    states = [{"w": torch.tensor([3.0, 2.0])}, {"w": torch.tensor([5.0, 5.0])}]
    # p = (1/4, 3/4), tau = (10, 40): tau_eff = 2.5 + 30 = 32.5; d_1 = (.2, .1), d_2 = (.1, .1);
    # sum p d = (.05 + .075, .025 + .075) = (.125, .1); x+ = 1 + 32.5 * (.125, .1) = (5.0625, 4.25)
    assert fednova.effective_steps([1.0, 3.0], [10, 40]) == 32.5
    assert torch.allclose(fednova.normalized_average(previous, states, [1.0, 3.0], [10, 40])["w"],
                          torch.tensor([5.0625, 4.25]))
    # FedAvg's weighted mean would give (4.5, 4.25): the 40-step client's larger move dominates it
    assert torch.allclose(weighted_mean(states, [1.0, 3.0])["w"], torch.tensor([4.5, 4.25]))


def test_with_equal_steps_it_is_the_weighted_mean():
    torch.manual_seed(0)
    previous = {"a": torch.randn(3, 2), "b": torch.randn(4)}
    states = [{k: v + torch.randn_like(v) for k, v in previous.items()} for _ in range(3)]
    weights = [5.0, 1.0, 2.0]
    mixed, mean = fednova.normalized_average(previous, states, weights, [7, 7, 7]), weighted_mean(states, weights)
    for k in previous:
        assert mixed[k].dtype == previous[k].dtype
        assert torch.allclose(mixed[k], mean[k], atol=1e-6)


def test_bad_inputs_are_refused():
    x = {"w": torch.zeros(1)}
    with pytest.raises(ValueError, match="one weight and one step count per state"):
        fednova.normalized_average(x, [x, x], [1.0, 1.0], [3])
    with pytest.raises(ValueError, match="every client must take >= 1 step"):
        fednova.normalized_average(x, [x], [1.0], [0])


@pytest.mark.parametrize("name", ["flexlora", "hetlora", "flora", "fedex-lora"])
def test_refused_where_the_server_does_not_take_a_plain_mean(name):
    with pytest.raises(ValueError, match=f"fednova=1 .*{name} here needs the server's mean"):
        get_algorithm(name, Settings(algorithm=name, fednova=1, client_ranks="2,4,8,8"))


def test_refused_with_a_robust_rule():
    with pytest.raises(ValueError, match="fednova=1 .*needs aggregation=mean"):
        get_algorithm("fedlora", Settings(fednova=1, aggregation="median"))


def test_a_run_with_unequal_steps_follows_the_formula(tiny_bert, glue_dir, tmp_path, monkeypatch):
    """Clients of different sizes train one local epoch each (so different step counts); the
    global state after round 1 is x + tau_eff sum p_i (y_i - x) / tau_i of what they sent, with
    tau_i = ceil(rows_i / batch size) and p_i by examples."""
    import math

    import fedtune.checkpoint as checkpoints
    import fedtune.client_app as client_app

    settings = Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=1, train_limit=48,
                        eval_limit=16, batch_size=4, max_length=32, local_epochs=1.0, lora_r=2, engine="local",
                        partition="dirichlet", dirichlet_alpha=0.5, fednova=1, precision="fp32",
                        out_dir=str(tmp_path))
    sent, saved = {}, {}
    real_update, real_save = client_app.client_update, checkpoints.save

    def update(algorithm, partition_id, *args, **kwargs):
        result = real_update(algorithm, partition_id, *args, **kwargs)
        sent[partition_id] = result
        return result

    def keep(folder, state, algorithm_state, records, settings, server_state=None, *rest):
        saved[records[-1]["round"]] = {k: v.clone() for k, v in state.items()}
        real_save(folder, state, algorithm_state, records, settings, server_state, *rest)

    monkeypatch.setattr(client_app, "client_update", update)
    monkeypatch.setattr(checkpoints, "save", keep)
    run_federated(settings, quiet=True)
    sizes = [sent[p].num_examples for p in (0, 1)]
    steps = [sent[p].steps for p in (0, 1)]
    assert steps == [math.ceil(n / 4) for n in sizes] and steps[0] != steps[1]
    x, total = saved[0], sum(sizes)
    tau_eff = sum(n / total * t for n, t in zip(sizes, steps))
    for k in x:
        expected = x[k] + tau_eff * sum(n / total * (sent[p].state[k] - x[k]) / t
                                        for p, (n, t) in enumerate(zip(sizes, steps)))
        assert torch.allclose(saved[1][k], expected, atol=1e-6), k
