"""SCAFFOLD (option II): the maths against the paper's formulas, the gradient correction on a
hand-made model, and a two-round, two-client run whose files obey Algorithm 1 exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fedtune import scaffold
from fedtune.algorithms import get_algorithm
from fedtune.config import Settings
from fedtune.runs import read_jsonl
from fedtune.simulation import run_federated
from tests.conftest import comparable_rounds


def test_option_ii_and_the_server_update_by_hand():
    c_local, c_global = {"w": torch.tensor([1.0, -1.0])}, {"w": torch.tensor([0.5, 0.5])}
    sent, trained = {"w": torch.tensor([2.0, 2.0])}, {"w": torch.tensor([1.0, 3.0])}
    # c_i+ = c_i - c + (x - y) / (K lr) = [1 - .5 + 1/(4*.5), -1 - .5 + (-1)/(4*.5)] = [1, -2]
    assert torch.equal(scaffold.client_control(c_local, c_global, sent, trained, steps=4, lr=0.5)["w"],
                       torch.tensor([1.0, -2.0]))
    # c + (1/N) sum dc_i, N = 4 clients, 2 of them this round
    deltas = [{"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([2.0, 4.0])}]
    assert torch.equal(scaffold.server_control(c_global, deltas, 4)["w"], torch.tensor([1.5, 1.5]))
    assert torch.equal(scaffold.corrected_gradient(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.5])),
                       torch.tensor([2.5]))


def test_the_correction_reaches_every_travelling_gradient_and_is_removed_after():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    x = torch.tensor([[3.0, 4.0]])
    c_local, c_global = {"weight": torch.tensor([[1.0, 1.0]])}, {"weight": torch.tensor([[0.0, 3.0]])}
    with scaffold.corrected(model, c_local, c_global):
        model(x).sum().backward()
    assert torch.equal(model.weight.grad, torch.tensor([[3.0 - 1.0 + 0.0, 4.0 - 1.0 + 3.0]]))  # g - c_i + c
    model.weight.grad = None
    model(x).sum().backward()
    assert torch.equal(model.weight.grad, x)  # hooks gone
    with pytest.raises(ValueError, match="parameters the model does not have"):
        with scaffold.corrected(model, {"other": torch.zeros(1)}, {"other": torch.zeros(1)}):
            pass


def test_mean_gradient_adds_up_the_raw_gradients_by_hand():
    """Two backward passes of sum(w . x) on x = [3, 4] then [1, -2]: raw gradients [3, 4] and [1, -2]
    (the correction does not enter the sums); their mean over K = 2 steps is [2, 1]."""
    model = nn.Linear(2, 1, bias=False)
    c_local, c_global, sums = {"weight": torch.tensor([[1.0, 1.0]])}, {"weight": torch.tensor([[0.0, 3.0]])}, {}
    with scaffold.corrected(model, c_local, c_global, sums):
        for x in (torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, -2.0]])):
            model.weight.grad = None
            model(x).sum().backward()
    assert torch.equal(model.weight.grad, torch.tensor([[1.0 - 1.0 + 0.0, -2.0 - 1.0 + 3.0]]))  # still corrected
    means = scaffold.mean_gradient(sums, 2, {**c_global, "frozen": torch.ones(3)})
    assert torch.equal(means["weight"], torch.tensor([[2.0, 1.0]]))
    assert torch.equal(means["frozen"], torch.zeros(3))  # no gradient came: c_i = 0, as option II gives


def test_the_variate_setting_needs_scaffold():
    with pytest.raises(ValueError, match="scaffold-variate=mean-gradient .* needs scaffold=1"):
        Settings(scaffold_variate="mean-gradient").validate()


def test_the_correction_reaches_the_student_inside_fedkds_mutual_distillation(tiny_bert):
    """With the teacher on the client, the student trains inside `MutualDistillation`: its
    gradients are still g - c_i + c, and the teacher's (which never travels) are not corrected."""
    from fedtune.distill import MutualDistillation
    from fedtune.models import add_lora, load_classifier, trainable_state

    teacher = add_lora(load_classifier(tiny_bert, 2, seed=0), r=2, alpha=4)
    student = add_lora(load_classifier(tiny_bert, 2, seed=1), r=2, alpha=4)
    distiller = MutualDistillation(teacher, student)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 2000, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1, 0])}
    shapes = trainable_state(student)
    c_local = {k: torch.randn_like(v) for k, v in shapes.items()}
    c_global = {k: torch.randn_like(v) for k, v in shapes.items()}

    def gradients():
        distiller.zero_grad()
        distiller.loss(batch).backward()
        return {n: p.grad.clone() for n, p in distiller.named_parameters() if p.requires_grad}

    plain = gradients()
    with scaffold.corrected(student, c_local, c_global):
        corrected = gradients()
    for name, grad in corrected.items():
        key = name.removeprefix("student.")
        expected = plain[name] - c_local[key] + c_global[key] if name.startswith("student.") else plain[name]
        assert torch.allclose(grad, expected, atol=1e-6), name


@pytest.fixture(scope="module")
def base(tiny_bert, glue_dir, tmp_path_factory):
    return Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=2, train_limit=40,
                    eval_limit=16, batch_size=8, max_length=32, local_steps=2, lora_r=2, engine="local", scaffold=1,
                    precision="fp32", out_dir=str(tmp_path_factory.mktemp("runs")))


@pytest.mark.parametrize("changes", [{}, {"algorithm": "fedkdlora", "kd_placement": "client", "teacher_epochs": 0.05}],
                         ids=["fedlora", "fedkdlora-client-teachers"])
def test_two_rounds_follow_algorithm_1_and_count_the_variates(base, monkeypatch, changes, tmp_path):
    """From the files a run leaves (each client's c_i per round on its disk, the server's state and
    c in the checkpoint): y_i = x - K lr (c_i+ - c_i + c) for every client, and the next global
    state is the example-weighted mean of the y_i; c after a round is the mean of the c_i. With
    FedKDLoRA's teachers on the clients the student (what travels) is corrected and averaged so."""
    import fedtune.checkpoint as checkpoints

    base = base.replace(out_dir=str(tmp_path), **changes)

    saved = {}
    real_save = checkpoints.save

    def keep(folder, state, algorithm_state, records, settings, server_state=None, *rest):
        saved[records[-1]["round"]] = ({k: v.clone() for k, v in state.items()},
                                       {k: v.clone() for k, v in (server_state or {}).items()})
        real_save(folder, state, algorithm_state, records, settings, server_state, *rest)

    monkeypatch.setattr(checkpoints, "save", keep)
    path = run_federated(base, quiet=True)
    rounds = read_jsonl(path / "rounds.jsonl")
    sizes = [p["size"] for p in json.loads((path / "partitions.json").read_text())]
    folder = base.out_dir + f"/client-state/{path.name}/scaffold"
    c_local = {p: {k: torch.zeros_like(v) for k, v in saved[0][0].items()} for p in range(2)}
    for r in (1, 2):
        x, c = saved[r - 1][0], saved[r - 1][1] or {k: torch.zeros_like(v) for k, v in saved[0][0].items()}
        lr, steps = rounds[r]["lr"], base.local_steps
        new = {p: load_file(f"{folder}/client-{p}-round-{r}.safetensors") for p in range(2)}
        y = {p: {k: x[k] - steps * lr * (new[p][k] - c_local[p][k] + c[k]) for k in x} for p in range(2)}
        mean = {k: (sizes[0] * y[0][k] + sizes[1] * y[1][k]) / sum(sizes) for k in x}
        for k in x:
            assert torch.allclose(saved[r][0][k], mean[k], atol=1e-5), (r, k)
            assert torch.allclose(saved[r][1][k], c[k] + ((new[0][k] - c_local[0][k]) + (new[1][k] - c_local[1][k])) / 2,
                                  atol=1e-6), (r, k)
        c_local = new
    # Both variates travel: each message carries one more tensor per travelling tensor (fp32 values,
    # plus Flower's per-array names and headers, as for the state itself).
    plain = read_jsonl(run_federated(base.replace(scaffold=0), quiet=True) / "rounds.jsonl")
    variates = rounds[1]["travelling_parameters"] * 4 * 2  # fp32, 2 clients
    for direction in ("bytes_up", "bytes_down"):
        assert variates <= rounds[2][direction] - plain[2][direction] <= variates + 30_000, direction


def test_under_sgd_mean_gradient_equals_option_ii(base, tmp_path):
    """Under plain SGD, (x - y) / (K lr) = mean(g_k - c_i + c), so option II's c_i+ is the mean raw
    gradient: two runs, one per variate, leave the same c_i on every client's disk, round by round,
    and the same dev losses. (Their bytes may differ by a few arrays: Flower sends identical arrays
    once, and a variate that is exactly 0 under one formula is 1e-9 under the other.)"""
    runs = {}
    for variate in ("option-ii", "mean-gradient"):
        settings = base.replace(out_dir=str(tmp_path / variate), client_optimizer="sgd", lora_lr=0.05,
                                scaffold_variate=variate)
        path = run_federated(settings, quiet=True)
        runs[variate] = (path, settings.out_dir + f"/client-state/{path.name}/scaffold")
    for r in (1, 2):
        for p in range(2):
            a, b = (load_file(f"{folder}/client-{p}-round-{r}.safetensors") for _, folder in runs.values())
            assert max(v.abs().max() for v in a.values()) > 1e-3, (r, p)  # not trivially equal
            for k in a:
                assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), (r, p, k)
    a, b = (read_jsonl(path / "rounds.jsonl") for path, _ in runs.values())
    assert [r["dev_loss"] for r in a] == pytest.approx([r["dev_loss"] for r in b], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("round_", [0, 1])  # round 0's checkpoint is written before c exists
def test_a_resumed_scaffold_run_equals_the_uninterrupted_one(base, resumed_run, round_):
    reference = run_federated(base.replace(out_dir=base.out_dir + "/reference"), quiet=True)
    resumed = resumed_run(base.replace(out_dir=base.out_dir + f"/resumed-{round_}"), round_)
    ignored = ("seconds", "elapsed", "bytes")
    assert comparable_rounds(resumed, ignored) == comparable_rounds(reference, ignored)


@pytest.mark.parametrize("name", ["flexlora", "hetlora", "flora"])
def test_scaffold_is_refused_where_client_states_differ_in_shape(name):
    with pytest.raises(ValueError, match=f"scaffold=1 .*{name} here needs same-shape client states"):
        get_algorithm(name, Settings(algorithm=name, scaffold=1, client_ranks="2,4,8,8"))


def test_scaffold_is_refused_under_fp16s_grad_scaler():
    # The correction hook sees the scaler's scaled gradients (g * S), so c - c_i would be added in
    # other units; bf16 and fp32 have no scaler.
    with pytest.raises(ValueError, match=r"scaffold=1 .*fedlora here needs precision bf16, fp32 or auto \(not fp16\)"):
        get_algorithm("fedlora", Settings(scaffold=1, precision="fp16"))
    get_algorithm("fedlora", Settings(scaffold=1, precision="bf16"))  # accepted
