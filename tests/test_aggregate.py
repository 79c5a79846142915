import pytest
import torch

from fedtune.algorithms import algorithm_names, get_algorithm, register
from fedtune.algorithms.aggregate import invalid_reason, weighted_mean
from fedtune.algorithms.base import Algorithm
from fedtune.config import Settings


@pytest.mark.parametrize("name", algorithm_names())
def test_every_algorithm_aggregates_to_the_hand_computed_weighted_mean(name):
    # Prepare: two clients, weights 1 and 3 (examples).
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "b": torch.tensor([4.0])}
    # Execute
    merged = get_algorithm(name).aggregate([a, b], [1.0, 3.0])
    if name == "feddyn":  # the paper's server takes the unweighted mean: (a + b) / 2
        assert torch.equal(merged["w"], torch.tensor([[3.0, 4.0], [5.0, 6.0]]))
        assert torch.equal(merged["b"], torch.tensor([2.0]))
        return
    # Assert: (1*a + 3*b) / 4
    assert torch.equal(merged["w"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(merged["b"], torch.tensor([3.0]))


def test_weighted_mean_keeps_dtype_and_rejects_bad_weights():
    half = {"x": torch.tensor([1.0, 3.0], dtype=torch.float16)}
    assert weighted_mean([half, half], [1, 1])["x"].dtype == torch.float16
    with pytest.raises(ValueError, match="one weight per state"):
        weighted_mean([half], [1, 2])
    with pytest.raises(ValueError, match="sum to > 0"):
        weighted_mean([half], [0])


@pytest.mark.parametrize("update, reason", [
    ({"w": torch.tensor([1.0, float("nan")])}, "NaN or Inf"),
    ({"w": torch.tensor([1.0, float("inf")])}, "NaN or Inf"),
    ({"w": torch.zeros(3)}, "shape"),
    ({"v": torch.zeros(2)}, "keys differ"),
    ({"w": torch.zeros(2), "extra": torch.zeros(1)}, "keys differ"),
])
def test_bad_updates_are_named(update, reason):
    assert reason in invalid_reason(update, {"w": torch.zeros(2)})


def test_good_update_passes():
    assert invalid_reason({"w": torch.ones(2)}, {"w": torch.zeros(2)}) is None


def test_registry_refuses_duplicates_and_names_known_algorithms():
    with pytest.raises(ValueError, match="already registered"):
        @register
        class Again(Algorithm):
            name = "fedavg"
    with pytest.raises(ValueError, match=r"unknown algorithm 'fedsgd' \(known: .*fedavg.*fedlora"):
        get_algorithm("fedsgd")


def test_median_and_trimmed_mean_are_coordinatewise():
    from fedtune.algorithms.aggregate import robust_aggregate

    states = [{"w": torch.tensor([1.0, 10.0])}, {"w": torch.tensor([2.0, -5.0])}, {"w": torch.tensor([100.0, 0.0])},
              {"w": torch.tensor([3.0, 1.0])}, {"w": torch.tensor([4.0, 2.0])}]
    weights = [1.0, 1.0, 50.0, 1.0, 1.0]  # robust rules ignore the weights
    torch.testing.assert_close(robust_aggregate(states, weights, "median")["w"], torch.tensor([3.0, 1.0]))
    # 5 clients, cut 0.2: drop one value at each end of every coordinate, average the other three.
    trimmed = robust_aggregate(states, weights, "trimmed-mean", trim_fraction=0.2)["w"]
    torch.testing.assert_close(trimmed, torch.tensor([(2 + 3 + 4) / 3, (0 + 1 + 2) / 3]))


def test_krum_keeps_a_state_from_the_honest_cluster():
    from fedtune.algorithms.aggregate import robust_aggregate

    honest = [{"w": torch.tensor([1.0, 1.0]) + 0.01 * i} for i in range(4)]
    attacker = {"w": torch.tensor([50.0, -50.0])}
    chosen = robust_aggregate(honest + [attacker], [1.0] * 5, "krum", num_malicious=1)
    assert any(torch.equal(chosen["w"], h["w"]) for h in honest)


@pytest.mark.parametrize("algorithm", ["flexlora", "hetlora"])
@pytest.mark.parametrize("changes, needs", [({"aggregation": "median"}, "aggregation=mean"),
                                            ({"dp_noise": 1.0}, "dp-noise=0"),
                                            ({"secure_aggregation": "secagg+"}, "secure-aggregation=none")])
def test_heterogeneous_ranks_refuse_what_needs_same_shape_updates(algorithm, changes, needs):
    with pytest.raises(ValueError, match=f"{algorithm} clients send updates of different shapes.*needs {needs}"):
        get_algorithm(algorithm, Settings(algorithm=algorithm, **changes))
    assert get_algorithm("fedlora", Settings(**changes)).same_shape_updates  # the same settings are fine there


def test_peft_key_names_are_parsed_in_one_place():
    from fedtune.algorithms.lora_maths import lora_key, lora_pairs

    assert lora_key("base_model.model.bert.layer.0.query.lora_A.default.weight") == (
        "base_model.model.bert.layer.0.query", "A", "default.weight")
    assert lora_key("x.lora_B.default.weight")[1] == "B" and lora_key("classifier.weight") is None
    state = {"m.lora_A.default.weight": torch.zeros(2, 3), "m.lora_B.default.weight": torch.zeros(3, 2),
             "classifier.weight": torch.zeros(2, 3)}
    assert lora_pairs(state) == {"m": ("m.lora_A.default.weight", "m.lora_B.default.weight")}
