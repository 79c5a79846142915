"""FedEx-LoRA and FLoRA: after aggregation, base + scale * B A is exactly base + the weighted mean
of the clients' updates (hand-computed tensors, then the real tiny model on server and client)."""

import pytest
import torch

from fedtune.algorithms import get_algorithm
from fedtune.algorithms.base_merges import base_weights, fold_in
from fedtune.algorithms.lora_maths import fedex_residual, flora_stack, lora_pairs
from fedtune.config import Settings
from fedtune.local import cached_model, initial_state


def test_fedex_residual_completes_the_averaged_adapter_by_hand():
    # Two clients, rank 1, 2x2 weights, weights 1 and 3, scale 2.
    A1, B1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])
    A2, B2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]])
    P, Q = fedex_residual([A1, A2], [B1, B2], [1.0, 3.0], scale=2.0)
    mean_a, mean_b = torch.tensor([[0.25, 0.75]]), torch.tensor([[0.25], [0.75]])
    exact = 2.0 * (0.25 * B1 @ A1 + 0.75 * B2 @ A2)  # [[0.5, 0], [0, 1.5]]
    assert torch.allclose(exact, torch.tensor([[0.5, 0.0], [0.0, 1.5]]))
    assert torch.allclose(2.0 * mean_b @ mean_a + P @ Q, exact)
    assert P.shape == (2, 3) and Q.shape == (3, 2)  # rank (K + 1) r


def test_flora_stack_is_the_weighted_sum_of_updates_with_mixed_ranks():
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(r, 5, generator=g) for r in (1, 2, 4)]
    Bs = [torch.randn(3, r, generator=g) for r in (1, 2, 4)]
    weights, scales = [1.0, 1.0, 2.0], [8.0, 4.0, 2.0]
    P, Q = flora_stack(As, Bs, weights, scales)
    expected = sum(w / 4.0 * s * B @ A for w, s, A, B in zip(weights, scales, As, Bs))
    torch.testing.assert_close(P @ Q, expected)
    assert P.shape == (3, 7)  # the sum of the ranks


def _perturbed(state: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.mark.parametrize("name, ranks", [("fedex-lora", "2,2"), ("flora", "2,4")])
def test_server_and_client_models_equal_base_plus_the_mean_client_update(tiny_bert, name, ranks):
    settings = Settings(task="cola", model=tiny_bert, algorithm=name, clients=2, client_ranks=ranks, lora_r=2,
                        lora_alpha=4.0, seed=7)
    algorithm = get_algorithm(name, settings)
    start = initial_state(algorithm)
    clients = [_perturbed(algorithm.client_state(start, p), seed=p + 1) for p in (0, 1)]
    weights = [1.0, 3.0]
    extras_round_1 = algorithm.downlink_extras(0, 1)
    server = cached_model(algorithm, algorithm.server_settings())
    pristine = {k: w.clone() for k, w in base_weights(server).items()}  # nothing folded in yet
    new_state, _ = algorithm.server_update(server, algorithm.aggregate(clients, weights), 1, start)

    server_pairs = lora_pairs(new_state)
    for prefix, base in base_weights(server).items():
        expected = pristine[prefix] + sum(
            w / 4.0 * (4.0 / c[lora_pairs(c)[prefix][0]].shape[0]) * c[lora_pairs(c)[prefix][1]] @ c[lora_pairs(c)[prefix][0]]
            for w, c in zip(weights, clients))
        a, b = (new_state[k] for k in server_pairs[prefix])
        effective = base + (4.0 / a.shape[0]) * b @ a
        torch.testing.assert_close(effective, expected, rtol=0, atol=1e-5)
    assert extras_round_1 == {}  # nothing to fold in before round 1

    # A client (its own model, pristine base) folds in what it is sent for round 2: the server's base.
    extras = algorithm.downlink_extras(1, 2)
    assert extras and all(k.startswith("1/") for k in extras)
    client = algorithm.build_model(algorithm.client_settings(1))
    assert fold_in(base_weights(client), extras, 0) == 1
    for prefix, base in base_weights(client).items():
        torch.testing.assert_close(base, base_weights(server)[prefix], rtol=0, atol=1e-6)
    assert algorithm.downlink_extras(1, 3) == {}  # round 2's update does not exist yet; round 1's was sent
    with pytest.raises(RuntimeError, match=r"round\(s\) \[1\] never reached it"):
        fold_in(base_weights(client), {k.replace("1/", "2/", 1): v for k, v in extras.items()}, 0)


def test_flora_restarts_lora_each_round_and_fedex_keeps_the_average(tiny_bert):
    for name in ("flora", "fedex-lora"):
        settings = Settings(task="cola", model=tiny_bert, algorithm=name, clients=2, client_ranks="2,2", lora_r=2)
        algorithm = get_algorithm(name, settings)
        start = initial_state(algorithm)
        clients = [_perturbed(start, seed=p) for p in (1, 2)]
        server = cached_model(algorithm, algorithm.server_settings())
        new, _ = algorithm.server_update(server, algorithm.aggregate(clients, [1.0, 1.0]), 1, start)
        b_key = next(k for k in new if ".lora_B." in k)
        if name == "flora":
            assert torch.count_nonzero(new[b_key]) == 0  # B restarts at zero (A is drawn afresh)
            a_key = b_key.replace("lora_B", "lora_A")
            assert not torch.equal(new[a_key], start[a_key])
        else:
            torch.testing.assert_close(new[b_key], (clients[0][b_key] + clients[1][b_key]) / 2)


def test_exact_algorithms_refuse_what_would_break_the_shared_base():
    for name in ("fedex-lora", "flora"):
        with pytest.raises(ValueError, match="needs dropout=0"):
            get_algorithm(name, Settings(algorithm=name, dropout=0.2))
    with pytest.raises(ValueError, match="aggregation=mean"):
        get_algorithm("fedex-lora", Settings(algorithm="fedex-lora", aggregation="median"))
