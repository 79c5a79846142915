"""FlexLoRA / HetLoRA maths against dense reference computations, and rank assignment."""

import pytest
import torch

from fedtune.algorithms import get_algorithm
from fedtune.algorithms.aggregate import weighted_mean
from fedtune.algorithms.lora_maths import (flexlora_aggregate, hetlora_aggregate, merged_delta_svd,
                                           truncate_for_client, zero_pad)
from fedtune.config import Settings
from fedtune.ranks import assign_ranks

ALPHA, OUT, IN = 16.0, 12, 10
A_KEY, B_KEY, HEAD = "m.lora_A.default.weight", "m.lora_B.default.weight", "head.weight"


def client_state(rank: int, seed: int, true_rank: int | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(rank, IN, generator=g), torch.randn(OUT, rank, generator=g)
    if true_rank is not None:  # only the first `true_rank` components are used
        B[:, true_rank:] = 0
    return {A_KEY: A, B_KEY: B, HEAD: torch.randn(2, 3, generator=g)}


def dense_mean(states, weights):
    """Independent route: form every client's full delta and average."""
    total = sum(weights)
    return sum((w / total) * (ALPHA / s[A_KEY].shape[0]) * s[B_KEY] @ s[A_KEY] for s, w in zip(states, weights))


def client_delta(state):
    return (ALPHA / state[A_KEY].shape[0]) * state[B_KEY].double() @ state[A_KEY].double()


def test_thin_factor_svd_matches_the_dense_svd():
    states, weights = [client_state(r, i) for i, r in enumerate((2, 3, 4))], [1.0, 2.0, 3.0]
    coefficients = [(w / 6.0) * ALPHA / s[A_KEY].shape[0] for s, w in zip(states, weights)]
    U, S, Vh = merged_delta_svd([s[A_KEY] for s in states], [s[B_KEY] for s in states], coefficients)
    W = dense_mean(states, weights).double()
    assert torch.allclose(U @ torch.diag(S) @ Vh, W, atol=1e-10)
    assert torch.allclose(S[:9], torch.linalg.svdvals(W)[:9], atol=1e-10)


def test_clients_whose_rank_covers_the_mean_get_it_exactly():
    # Each client's delta has rank 1, so W has rank <= 3 <= every client's rank.
    ranks, weights = (4, 4, 8), [10.0, 30.0, 60.0]
    states = [client_state(r, i, true_rank=1) for i, r in enumerate(ranks)]
    W = dense_mean(states, weights).double()
    merged = flexlora_aggregate(states, weights, ALPHA, server_rank=sum(ranks))
    for rank in ranks:
        assert torch.allclose(client_delta(truncate_for_client(merged, rank, rescale=True)), W, atol=1e-5)


def test_truncation_error_equals_the_discarded_singular_values():
    ranks, weights = (2, 4, 8), [1.0, 1.0, 2.0]
    states = [client_state(r, 10 + i) for i, r in enumerate(ranks)]
    W = dense_mean(states, weights).double()
    sigma = torch.linalg.svdvals(W)
    merged = flexlora_aggregate(states, weights, ALPHA, server_rank=14)
    for rank in (1, 2, 4, 8):
        error = torch.linalg.norm(W - client_delta(truncate_for_client(merged, rank, rescale=True))) ** 2
        assert error.item() == pytest.approx((sigma[rank:] ** 2).sum().item(), rel=1e-4)


def test_per_client_shapes_and_head_average():
    ranks = (4, 8, 16)
    states = [client_state(r, i) for i, r in enumerate(ranks)]
    merged = flexlora_aggregate(states, [1.0, 1.0, 2.0], ALPHA, server_rank=28)
    assert merged[A_KEY].shape == (28, IN) and merged[B_KEY].shape == (OUT, 28)
    for rank in ranks:
        sent = truncate_for_client(merged, rank, rescale=True)
        assert sent[A_KEY].shape == (rank, IN) and sent[B_KEY].shape == (OUT, rank)
    expected_head = (states[0][HEAD] + states[1][HEAD] + 2 * states[2][HEAD]) / 4
    assert torch.allclose(merged[HEAD], expected_head, atol=1e-6)


def test_hetlora_with_equal_ranks_is_fedlora():
    states, weights = [client_state(4, i) for i in range(3)], [1.0, 2.0, 5.0]
    het = hetlora_aggregate(states, weights, server_rank=4)
    plain = weighted_mean(states, weights)
    assert all(torch.allclose(het[k], plain[k]) for k in plain)


def test_hetlora_pads_with_zeros_then_truncates():
    small = {A_KEY: torch.ones(1, IN), B_KEY: torch.ones(OUT, 1)}
    large = {A_KEY: 3 * torch.ones(2, IN), B_KEY: 3 * torch.ones(OUT, 2)}
    merged = hetlora_aggregate([small, large], [1.0, 1.0], server_rank=2)
    assert torch.equal(merged[A_KEY][0], torch.full((IN,), 2.0))  # (1 + 3) / 2
    assert torch.equal(merged[A_KEY][1], torch.full((IN,), 1.5))  # (0 + 3) / 2: padding counts as zero
    assert torch.equal(truncate_for_client(merged, 1, rescale=False)[A_KEY], merged[A_KEY][:1])


@pytest.mark.parametrize("distribution, expected", [
    ("heavy-tail-light", [4, 4, 8, 16]),
    ("heavy-tail-strong", [8, 16, 32, 32]),
    ("uniform", [4, 8, 16, 32]),
    ("homo", [8, 8, 8, 8]),
])
def test_rank_assignment_follows_the_distribution(distribution, expected):
    ranks = assign_ranks(distribution, "4,8,16,32", 4, seed=0, default_rank=8)
    assert sorted(ranks) == expected
    assert ranks == assign_ranks(distribution, "4,8,16,32", 4, seed=0, default_rank=8)


def test_rank_assignment_inputs_are_checked():
    assert assign_ranks("uniform", "4,8", 3, 0, 8, client_ranks="2,4,6") == [2, 4, 6]
    with pytest.raises(ValueError, match="lists 2 ranks for 3 clients"):
        assign_ranks("uniform", "4,8", 3, 0, 8, client_ranks="2,4")
    with pytest.raises(ValueError, match="rank-set='4,x'"):
        assign_ranks("uniform", "4,x", 3, 0, 8)


def test_algorithms_give_each_client_its_rank():
    settings = Settings(algorithm="flexlora", clients=4, rank_distribution="heavy-tail-light")
    flex = get_algorithm("flexlora", settings)
    assert [flex.client_settings(p).lora_r for p in range(4)] == flex.ranks
    assert flex.server_settings().lora_r == sum(flex.ranks)
    assert get_algorithm("hetlora", settings.replace(algorithm="hetlora")).server_settings().lora_r == 16


@pytest.mark.parametrize("rescale, ratio", [(0, 4.0), (1, 1.0)])
def test_hetlora_truncated_components_mean_the_same_update_on_client_and_server(rescale, ratio):
    # A rank-4 client of a rank-16 server: the client runs its LoRA at alpha / 4, the server the
    # same components at alpha / 16. Plain truncation makes them 4x larger on the client.
    alpha, R, r = 16.0, 16, 4
    torch.manual_seed(0)
    server = {A_KEY: torch.randn(R, IN), B_KEY: torch.randn(OUT, R)}
    settings = Settings(algorithm="hetlora", clients=2, client_ranks=f"{R},{r}", lora_alpha=alpha,
                        hetlora_rescale=rescale)
    sent = get_algorithm("hetlora", settings).client_state(server, partition_id=1)
    on_client = (alpha / r) * sent[B_KEY] @ sent[A_KEY]
    on_server = (alpha / R) * server[B_KEY][:, :r] @ server[A_KEY][:r]
    assert torch.linalg.norm(on_client) / torch.linalg.norm(on_server) == pytest.approx(ratio, rel=1e-5)
    # And back: padding the client's pair keeps its update under the server's scale (rescale=1).
    padded = zero_pad(sent, R, rescale=bool(rescale))
    back = (alpha / R) * padded[B_KEY] @ padded[A_KEY]
    assert torch.linalg.norm(back) / torch.linalg.norm(on_client) == pytest.approx(1.0 / ratio, rel=1e-5)


def test_hetlora_sparsity_weighting_weighs_modules_by_update_norm():
    head = "classifier.weight"
    small = {A_KEY: torch.ones(1, IN), B_KEY: torch.ones(OUT, 1), head: torch.zeros(2)}
    large = {A_KEY: torch.ones(1, IN), B_KEY: 3 * torch.ones(OUT, 1), head: torch.ones(2)}
    # ||B A|| is 1x and 3x the same matrix: weights 1/4 and 3/4, so B = (1 * 1 + 3 * 3) / 4 = 2.5.
    merged = hetlora_aggregate([small, large], [1.0, 1.0], server_rank=1, sparsity_alpha=16.0)
    assert torch.allclose(merged[B_KEY], torch.full((OUT, 1), 2.5))
    assert torch.allclose(merged[A_KEY], torch.ones(1, IN))
    assert torch.equal(merged[head], torch.full((2,), 0.5))  # the head keeps the example weights
    by_examples = hetlora_aggregate([small, large], [1.0, 1.0], server_rank=1)
    assert torch.allclose(by_examples[B_KEY], torch.full((OUT, 1), 2.0))


def test_hetlora_pruning_regulariser_by_hand():
    from fedtune.algorithms.lora_maths import tail_norm

    A, B = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert tail_norm([(A, B)], keep=1).item() == 8.0  # ||A[1:]|| * ||B[:, 1:]|| = 2 * 4
    assert tail_norm([(A, B), (A, B)], keep=2).item() == 0.0


def test_hetlora_client_cuts_its_rank_when_training_shrinks_the_tail(tiny_bert, glue_dir, tmp_path):
    from fedtune.algorithms.hetlora import lora_parameters
    from fedtune.local import cached_model, client_update, initial_state

    settings = Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, algorithm="hetlora", clients=2,
                        client_ranks="4,2", train_limit=40, eval_limit=16, batch_size=8, max_length=32, local_steps=3,
                        hetlora_prune=0.75, hetlora_prune_weight=100.0, out_dir=str(tmp_path))
    algorithm = get_algorithm("hetlora", settings)
    start = {k: v + 0.05 * torch.randn_like(v) for k, v in initial_state(algorithm).items()}  # a non-zero tail
    sent = algorithm.client_state(start, 0)
    result = client_update(algorithm, 0, 2, sent, 2, 1e-3)
    # A strong regulariser shrinks the component past int(0.75 * 4) = 3, so the client cuts to rank 3.
    assert int(result.kept_state["rank"]) == 3
    for key, value in result.state.items():
        if ".lora_A." in key:
            assert torch.count_nonzero(value[3:]) == 0 and torch.count_nonzero(value[:3]) > 0
        if ".lora_B." in key:
            assert torch.count_nonzero(value[:, 3:]) == 0
    # Next round it starts at rank 3: whatever the server sends past it is cut before training.
    again = client_update(algorithm, 0, 2, sent, 3, 1e-3, kept_state=result.kept_state)
    assert int(again.kept_state["rank"]) <= 3
    assert all(torch.count_nonzero(v[3:]) == 0 for k, v in again.state.items() if ".lora_A." in k)
    model = cached_model(algorithm, algorithm.client_settings(0))
    assert len(lora_parameters(model)) == 8  # tiny BERT: query and value in 4 layers
    # Without the regulariser and gamma = 1, nothing is cut.
    off = get_algorithm("hetlora", settings.replace(hetlora_prune=1.0))
    assert int(client_update(off, 0, 2, sent, 2, 1e-3).kept_state["rank"]) == 4
