"""FedAvgM's server momentum (`server-momentum`): the step against Flower's own FedAvgM strategy
and a hand computation, wired into a real run round after round, kept across a resume, and
refused where it cannot apply."""

import numpy as np
import pytest
import torch

from fedtune.algorithms import get_algorithm
from fedtune.algorithms.aggregate import fedavgm_step
from fedtune.config import Settings
from fedtune.simulation import run_federated
from tests.conftest import comparable_rounds


def test_the_step_by_hand_and_the_first_round_is_plain_fedavg():
    algorithm = get_algorithm("fedlora", Settings(server_momentum=0.5))
    x0 = {"w": torch.tensor([1.0, -2.0])}
    # round 1: g = x0 - mean = [.2, -.4], v = g, x1 = x0 - v = the mean itself
    x1, _ = algorithm.after_aggregation(None, {"w": torch.tensor([0.8, -1.6])}, 1, x0)
    torch.testing.assert_close(x1["w"], torch.tensor([0.8, -1.6]))
    # round 2: mean = x1 - [.1, .1]: g = [.1, .1], v = .5 [.2, -.4] + g = [.2, -.1], x2 = x1 - v
    resumed = get_algorithm("fedlora", Settings(server_momentum=0.5))  # a resumed server: momentum restored
    resumed.load_saved(algorithm.saved_state(), None)
    x2, _ = resumed.after_aggregation(None, {"w": torch.tensor([0.7, -1.7])}, 2, x1)
    torch.testing.assert_close(x2["w"], torch.tensor([0.6, -1.5]))
    assert x2["w"].dtype == torch.float32
    # without momentum the server keeps the mean
    plain = get_algorithm("fedlora", Settings())
    assert torch.equal(plain.after_aggregation(None, {"w": torch.tensor([0.7, -1.7])}, 2, x1)[0]["w"],
                       torch.tensor([0.7, -1.7]))
    assert plain.saved_state() == {}


def test_the_step_equals_flowers_fedavgm_strategy_bit_for_bit_over_rounds():
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
    from flwr.serverapp.strategy import FedAvgM as FlowerFedAvgM

    class Averaged(FlowerFedAvg):
        def aggregate_train(self, server_round, replies):
            return replies, None

    class Reference(FlowerFedAvgM, Averaged):
        pass

    flower = Reference(server_momentum=0.9)
    rng = np.random.default_rng(0)
    current = {"a": rng.standard_normal((3, 2)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    velocity = {}
    for server_round in (1, 2, 3):
        averaged = {k: (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32) for k, x in current.items()}
        flower.current_arrays = ArrayRecord({k: Array(x.copy()) for k, x in current.items()})
        expected, _ = flower.aggregate_train(server_round, ArrayRecord({k: Array(x) for k, x in averaged.items()}))
        current, velocity = fedavgm_step(current, averaged, velocity, 0.9)
        for k in current:
            assert np.array_equal(current[k], expected[k].numpy()), (server_round, k)


@pytest.fixture
def base(tiny_bert, glue_dir, tmp_path):
    return Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=3, train_limit=40,
                    eval_limit=16, batch_size=8, max_length=32, local_steps=2, lora_r=2, engine="local",
                    precision="fp32", server_momentum=0.5, out_dir=str(tmp_path))


def test_a_run_steps_each_round_from_the_mean_with_the_momentum(base, monkeypatch):
    """From the means the server computed and the global states it saved: x_t = x_{t-1} - v_t,
    v_t = 0.5 v_{t-1} + (x_{t-1} - mean_t), v_1 = x_0 - mean_1, by hand in torch."""
    import fedtune.checkpoint as checkpoints
    from fedtune.algorithms.fedlora import FedLoRA

    means, saved = [], {}
    real_aggregate, real_save = FedLoRA.aggregate, checkpoints.save

    def keep_mean(self, states, weights):
        mean = real_aggregate(self, states, weights)
        means.append({k: v.clone() for k, v in mean.items()})
        return mean

    def keep_state(folder, state, algorithm_state, records, *args):
        saved[records[-1]["round"]] = ({k: v.clone() for k, v in state.items()}, dict(algorithm_state))
        real_save(folder, state, algorithm_state, records, *args)

    monkeypatch.setattr(FedLoRA, "aggregate", keep_mean)
    monkeypatch.setattr(checkpoints, "save", keep_state)
    run_federated(base, quiet=True)
    assert len(means) == 3 and sorted(saved) == [0, 1, 2, 3]
    velocity = None
    for t in (1, 2, 3):
        previous, mean = saved[t - 1][0], means[t - 1]
        assert any(not torch.equal(previous[k], mean[k]) for k in mean)  # the clients moved it
        gradient = {k: previous[k] - mean[k] for k in mean}
        velocity = gradient if velocity is None else {k: 0.5 * velocity[k] + gradient[k] for k in mean}
        for k in mean:
            torch.testing.assert_close(saved[t][0][k], previous[k] - velocity[k], rtol=0, atol=1e-6)
            torch.testing.assert_close(saved[t][1][f"server-momentum.{k}"], velocity[k], rtol=0, atol=1e-6)
    assert saved[0][1] == {}  # no momentum before round 1


@pytest.mark.slow
@pytest.mark.parametrize("round_", [0, 2])  # round 0's checkpoint is written before any momentum exists
def test_a_resumed_run_equals_the_uninterrupted_one(base, resumed_run, round_):
    reference = run_federated(base.replace(out_dir=base.out_dir + "/reference"), quiet=True)
    resumed = resumed_run(base.replace(out_dir=base.out_dir + f"/resumed-{round_}"), round_)
    assert comparable_rounds(resumed) == comparable_rounds(reference)


@pytest.mark.parametrize("name", ["flexlora", "hetlora", "flora"])
def test_refused_where_client_states_differ_in_shape(name):
    with pytest.raises(ValueError, match=f"server-momentum=0.9 .*{name}'s clients send states of different shapes"):
        get_algorithm(name, Settings(algorithm=name, server_momentum=0.9, client_ranks="2,4,8,8"))


def test_refused_with_fedadam_and_outside_zero_one():
    with pytest.raises(ValueError, match="fedadam is its own server optimizer"):
        get_algorithm("fedadam", Settings(algorithm="fedadam", server_momentum=0.9))
    with pytest.raises(ValueError, match="fedadam-full is its own server optimizer"):
        get_algorithm("fedadam-full", Settings(algorithm="fedadam-full", server_momentum=0.9))
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"server-momentum={bad} \(must be in \[0, 1\)\)"):
            Settings(server_momentum=bad)


def test_a_remedy_name_for_compare():
    from fedtune.grid import remedy_settings

    assert remedy_settings("server-momentum") == {"server_momentum": 0.9}
    assert remedy_settings("server-momentum+lda-init") == {"server_momentum": 0.9, "classifier_init": "lda"}
