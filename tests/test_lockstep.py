"""Batched clients (`batched-clients`, fedtune.lockstep): a combined step gives each client the
gradients of its own loss alone, and a federation trained in lockstep equals one trained one
client at a time."""

import threading

import pytest
import torch
from safetensors.torch import load_file

from fedtune import lockstep
from fedtune.config import Settings
from fedtune.models import add_lora, load_classifier, load_tokenizer, load_trainable_state, trainable_state
from fedtune.runs import read_jsonl
from fedtune.simulation import run_federated


def _batch(tokenizer, sentences, labels):
    encoded = tokenizer(sentences, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": torch.tensor(labels)}


def test_length_chunks_sorts_rows_by_length_and_cuts_at_the_token_budget():
    def batch(*ends, width=6):  # right-padded rows attending to their first `end` positions
        mask = torch.tensor([[1] * end + [0] * (width - end) for end in ends])
        return {"attention_mask": mask, "labels": torch.zeros(len(ends))}

    batches = [batch(2, 5, 2), batch(3, 6), batch(1)]
    # sorted by (length, client, row): (1: 2,0) (2: 0,0) (2: 0,2) (3: 1,0) (5: 0,1) (6: 1,1)
    assert lockstep.length_chunks(batches, 0) == [([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)], 6)]
    # 8 tokens: 4 rows x 2 fit (rows of length 1 and 2), a fourth at length 3 would be 12; then
    # (1,0) and (0,1) at 2 x 5 = 10 > 8: each alone, as is the longest row.
    assert lockstep.length_chunks(batches, 8) == [([(0, 0), (0, 2), (2, 0)], 2), ([(1, 0)], 3), ([(0, 1)], 5),
                                                  ([(1, 1)], 6)]
    left = {"attention_mask": torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]), "labels": torch.zeros(2)}
    assert lockstep.length_chunks([left], 100) == [([(0, 0), (0, 1)], 4)]  # left padding: nothing cut


@pytest.mark.parametrize("tokens", [0, 12], ids=["one-pass", "passes"])
@pytest.mark.parametrize("model_fixture", ["tiny_bert", "tiny_llama"])
def test_a_combined_step_gives_each_client_the_gradients_of_its_own_loss(request, monkeypatch, model_fixture, tokens):
    """Two clients with different LoRA weights and batches of different lengths (the decoder pools
    at the last non-pad token, so the extra padding of the combined batch must not move it), in one
    pass or in passes by length that mix the clients' rows."""
    monkeypatch.setattr(lockstep, "CHUNK_TOKENS", tokens)
    path = request.getfixturevalue(model_fixture)
    tokenizer = load_tokenizer(path)
    model = add_lora(load_classifier(path, 2, seed=0, dropout=0.0), r=2, alpha=4.0)
    torch.manual_seed(1)
    states = [{k: v + 0.1 * torch.randn_like(v) for k, v in trainable_state(model).items()} for _ in range(2)]
    batches = [_batch(tokenizer, ["a short one", "the cat sat", "yes"], [0, 1, 1]),
               _batch(tokenizer, ["a much longer sentence than the other client's rows are", "no"], [1, 0])]

    expected = []  # each client alone, through the model's own forward and loss
    model.train()
    for state, batch in zip(states, batches):
        load_trainable_state(model, state)
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        expected.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))

    room = lockstep.Room(2)
    members = [lockstep.Member(k, {n: t.clone().requires_grad_() for n, t in s.items()}) for k, s in enumerate(states)]
    losses = [None, None]

    def client(k):
        room.bind(model, "fp32")
        losses[k] = room.step(members[k], batches[k], lambda m, b: m(**b).loss)
        room.leave(members[k])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    room.serve()
    for thread in threads:
        thread.join(timeout=60)
    for member, loss, (want_loss, want_grads) in zip(members, losses, expected):
        assert loss == pytest.approx(want_loss, abs=1e-6)
        assert set(member.params) == set(want_grads)
        for name, tensor in member.params.items():
            torch.testing.assert_close(tensor.grad, want_grads[name], atol=1e-6, rtol=1e-5)


def test_a_member_that_leaves_is_not_waited_for(tiny_bert):
    """One client leaves before its first step (it failed): the other's steps still run, alone."""
    tokenizer = load_tokenizer(tiny_bert)
    model = add_lora(load_classifier(tiny_bert, 2, seed=0, dropout=0.0), r=2, alpha=4.0)
    room = lockstep.Room(2)
    room.bind(model, "fp32")
    gone, here = lockstep.Member(0), lockstep.Member(1, {n: t.clone().requires_grad_()
                                                         for n, t in trainable_state(model).items()})
    room.leave(gone)
    server = threading.Thread(target=room.serve)
    server.start()
    loss = room.step(here, _batch(tokenizer, ["one row"], [1]), lambda m, b: m(**b).loss)
    room.leave(here)
    server.join(timeout=60)
    assert not server.is_alive()  # it stops when every member has left
    assert loss > 0 and all(t.grad is not None for t in here.params.values())


@pytest.fixture(scope="module")
def skewed(tiny_bert, glue_dir, tmp_path_factory):
    """Three clients of unequal sizes (they leave the lockstep at different steps), no dropout."""
    return Settings(task="sst2", glue_dir=str(glue_dir), model=tiny_bert, clients=3, rounds=2, train_limit=150,
                    eval_limit=32, batch_size=8, max_length=32, local_epochs=0.5, lora_r=2, lora_lr=0.02,
                    partition="dirichlet", dirichlet_alpha=0.5, model_dropout=0.0, engine="local",
                    precision="fp32",  # the batching's maths; bf16 rounds a batch of other rows differently
                    out_dir=str(tmp_path_factory.mktemp("lockstep")))


_STEP = lockstep.Room._combined_step


def _run(settings, monkeypatch):
    """The finished run, and the clients in each combined step it took."""
    combined = []
    monkeypatch.setattr(lockstep.Room, "_combined_step", lambda room, requests: combined.append(len(requests))
                        or _STEP(room, requests))
    return run_federated(settings, quiet=True), combined


@pytest.mark.parametrize("changes", [
    {"algorithm": "fedlora"},
    {"algorithm": "fedlora", "chunk_tokens": 64},  # the combined steps in several passes
    pytest.param({"algorithm": "fedlora", "client_loss": "fedlc"}, marks=pytest.mark.slow),
    pytest.param({"algorithm": "ffa-lora"}, marks=pytest.mark.slow),
    pytest.param({"algorithm": "fedkdlora", "teacher_epochs": 0.05}, marks=pytest.mark.slow),
    pytest.param({"algorithm": "fedprox", "prox_mu": 1.0}, marks=pytest.mark.slow),
    pytest.param({"algorithm": "flexlora", "client_ranks": "2,4,2"}, marks=pytest.mark.slow),  # a room per rank
    pytest.param({"algorithm": "fedlora", "dropout": 0.4}, marks=pytest.mark.slow),  # clients fail before training
], ids=["fedlora", "fedlora-passes", "fedlc", "ffa-lora", "fedkdlora-server", "fedprox", "flexlora-mixed-ranks",
        "failing-clients"])
def test_batched_clients_equal_one_at_a_time(skewed, monkeypatch, changes):
    changes = dict(changes)
    monkeypatch.setattr(lockstep, "CHUNK_TOKENS", changes.pop("chunk_tokens", lockstep.CHUNK_TOKENS))
    passes, chunks = [], lockstep.length_chunks
    monkeypatch.setattr(lockstep, "length_chunks", lambda *a: passes.append(len(chunks(*a))) or chunks(*a))
    settings = skewed.replace(**changes)
    alone, none = _run(settings.replace(batched_clients="off"), monkeypatch)
    together, combined = _run(settings.replace(batched_clients="on"), monkeypatch)
    assert none == [] and max(combined) > 1 and 1 in combined  # batched, and clients left at different steps
    assert lockstep.CHUNK_TOKENS != 64 or max(passes) > 1  # the budget did cut steps into passes
    a, b = read_jsonl(alone / "rounds.jsonl"), read_jsonl(together / "rounds.jsonl")
    assert [r.get("clients") for r in a] == [r.get("clients") for r in b]
    for x, y in zip(a, b):
        for key in ("train_loss", "dev_loss", "dev_accuracy", "dev_auc", "examples_seen"):
            assert x.get(key) == pytest.approx(y.get(key), abs=1e-5), key
        for key in ("bytes_up", "bytes_down"):  # a few bytes per message: Flower's random ids are varints
            assert abs(x[key] - y[key]) <= 8 * max(1, len(x["clients"] or [])), key
    first, second = load_file(str(next((alone / "model").glob("*.safetensors")))), \
        load_file(str(next((together / "model").glob("*.safetensors"))))
    assert set(first) == set(second)
    for name in first:
        # Two rounds of training amplify the matmuls' rounding: batched and alone run different shapes,
        # which some BLAS kernels sum in a different order (on an Intel Xeon: 3.8e-5 apart at most).
        torch.testing.assert_close(first[name], second[name], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("changes, reason", [
    ({"algorithm": "hetlora"}, "hetlora clients cannot share a step"),
    ({"secure_aggregation": "secagg+"}, "SecAgg\\+ sends each round's messages in stages"),
    ({"model_dropout": -1.0}, "the model has dropout"),
    ({"scaffold": 1}, "scaffold=1 corrects each client's gradients on its own"),
    ({"algorithm": "fedavg"}, "fedavg clients cannot share a step"),
    ({"client_loss": "feddecorr"}, "client-loss feddecorr reads each client's features"),
    ({"client_loss": "moon"}, "client-loss moon reads each client's features"),
])
def test_batched_clients_on_refuses_what_would_not_be_exact(skewed, changes, reason):
    with pytest.raises(ValueError, match=f"batched-clients=on, but .*{reason}"):
        run_federated(skewed.replace(batched_clients="on", **changes), quiet=True)


def test_auto_batches_on_cuda_where_exact_and_on_where_exact(skewed):
    from fedtune.client_app import algorithm_for
    from fedtune.local import batched_clients

    on = skewed.replace(batched_clients="on")
    assert batched_clients(algorithm_for(on))  # fedlora, no dropout, local engine
    assert batched_clients(algorithm_for(on.replace(algorithm="flexlora")))  # a room per rank
    assert not batched_clients(algorithm_for(skewed))  # auto on a CPU: it measured slower there
    assert not batched_clients(algorithm_for(skewed.replace(model_dropout=-1.0)))  # BERT's own 0.1
    assert not batched_clients(algorithm_for(skewed.replace(engine="ray")))
    with pytest.raises(ValueError, match="needs engine local"):
        batched_clients(algorithm_for(on.replace(engine="ray")))
    assert not batched_clients(algorithm_for(skewed.replace(algorithm="hetlora")))  # its own local training
