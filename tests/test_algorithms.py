"""FFA-LoRA, FedProx and FedAdam against hand-computed tensors or reference formulas."""

import pytest
import torch
from torch import nn

from fedtune.algorithms import get_algorithm
from fedtune.algorithms.fedprox import proximal_term
from fedtune.config import Settings
from fedtune.models import trainable_state
from fedtune.train import supervised_loss


@pytest.fixture(scope="module")
def tiny(tiny_bert):
    return Settings(task="cola", model=tiny_bert, lora_r=2, lora_alpha=4.0)


def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _perturbed(state: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) for k, v in state.items()}


# ---- FFA-LoRA ----------------------------------------------------------------------------
def test_ffa_lora_sends_b_and_head_only_and_a_is_the_same_everywhere(tiny):
    algorithm = get_algorithm("ffa-lora", tiny.replace(algorithm="ffa-lora"))
    model, again = algorithm.build_model(algorithm.settings), algorithm.build_model(algorithm.settings)
    sent = trainable_state(model)
    assert sent and not any(".lora_A." in k for k in sent) and any(".lora_B." in k for k in sent)
    assert any("classifier" in k for k in sent)
    for name, module in _lora_modules(model).items():  # two builds (two processes) share A
        assert torch.equal(module.lora_A["default"].weight, _lora_modules(again)[name].lora_A["default"].weight)


@pytest.mark.parametrize("name, exact", [("ffa-lora", True), ("fedlora", False)])
def test_aggregated_delta_is_the_weighted_mean_of_client_deltas_only_when_a_is_frozen(tiny, name, exact):
    algorithm = get_algorithm(name, tiny.replace(algorithm=name))
    model = algorithm.build_model(algorithm.settings)
    clients = [_perturbed(trainable_state(model), seed) for seed in (1, 2)]
    weights = [3.0, 1.0]
    merged = algorithm.aggregate(clients, weights)
    scale = tiny.lora_alpha / tiny.lora_r
    modules = _lora_modules(model)
    assert modules
    for module_name, module in modules.items():
        def delta(state):  # (alpha / r) B @ A, with the frozen A when it does not travel
            a_key, b_key = f"{module_name}.lora_A.default.weight", f"{module_name}.lora_B.default.weight"
            a = state.get(a_key, module.lora_A["default"].weight.detach())
            return scale * state[b_key] @ a

        expected = sum(w * delta(c) for w, c in zip(weights, clients)) / sum(weights)
        if exact:
            torch.testing.assert_close(delta(merged), expected, rtol=0, atol=1e-5)
        else:  # averaging A and B separately is not averaging B @ A
            assert (delta(merged) - expected).abs().max() > 1e-2


# ---- FedProx -----------------------------------------------------------------------------
class _Quadratic(nn.Module):
    """A model whose task loss is 0, so the loss is the proximal term alone."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, **batch):
        return type("Output", (), {"loss": 0.0 * self.w.sum()})()


def test_fedprox_adds_mu_half_squared_distance_to_the_received_state():
    model = _Quadratic([1.0, 2.0, -1.0])
    received = {"w": torch.tensor([0.0, 2.0, 1.0])}
    algorithm = get_algorithm("fedprox", Settings(algorithm="fedprox", prox_mu=0.5))
    loss = algorithm.client_loss(model, received, supervised_loss)(model, {})
    # mu/2 * ((1-0)^2 + (2-2)^2 + (-1-1)^2) = 0.25 * 5
    assert loss.item() == pytest.approx(1.25)
    loss.backward()
    assert torch.allclose(model.w.grad, 0.5 * torch.tensor([1.0, 0.0, -2.0]))  # mu (w - w_global)
    assert proximal_term([(torch.tensor([3.0]), torch.tensor([1.0]))]).item() == 4.0


def test_fedlora_loss_has_no_proximal_term():
    model = _Quadratic([1.0])
    loss = get_algorithm("fedlora").client_loss(model, {"w": torch.tensor([5.0])}, supervised_loss)(model, {})
    assert loss.item() == 0.0


# ---- FedAdam -----------------------------------------------------------------------------
def _adam_reference(x, deltas, eta, b1, b2, tau):
    """Reddi et al.'s FedAdam, as Flower writes its bias correction (eta * sqrt(1 - b2^(t+1)) /
    (1 - b1^(t+1)) at round t), from the pseudo-gradients (averaged minus current state). `eta`: one
    rate, or one per round."""
    m = v = torch.zeros_like(x)
    etas = eta if isinstance(eta, list) else [eta] * len(deltas)
    for t, (delta, eta) in enumerate(zip(deltas, etas), start=1):
        m = b1 * m + (1 - b1) * delta
        v = b2 * v + (1 - b2) * delta**2
        x = x + eta * (1 - b2 ** (t + 1)) ** 0.5 / (1 - b1 ** (t + 1)) * m / (v.sqrt() + tau)
    return x


@pytest.mark.parametrize("name", ["fedadam", "fedadam-full"])  # LoRA state, FedAvg's whole model
def test_fedadam_takes_flowers_adam_step_on_the_averaged_update_and_resumes(name):
    settings = Settings(algorithm=name, server_lr=0.1, server_beta1=0.9, server_beta2=0.99, server_tau=1e-3)
    algorithm = get_algorithm(name, settings)
    x0 = torch.tensor([1.0, -2.0, 0.5])
    deltas = [torch.tensor([0.1, 0.0, -0.3]), torch.tensor([-0.2, 0.05, 0.1])]
    x1, metrics = algorithm.server_update(None, {"w": x0 + deltas[0]}, 1, {"w": x0})  # no model: FedAdam only steps
    assert metrics == {}
    torch.testing.assert_close(x1["w"], _adam_reference(x0, deltas[:1], 0.1, 0.9, 0.99, 1e-3))
    # A resumed server (fresh instance, moments restored) takes the same second step.
    resumed = get_algorithm(name, settings)
    resumed.restore(algorithm.checkpoint_state(), None)
    x2 = resumed.server_update(None, {"w": x1["w"] + deltas[1]}, 2, x1)[0]
    torch.testing.assert_close(x2["w"], _adam_reference(x0, deltas, 0.1, 0.9, 0.99, 1e-3))
    assert x2["w"].dtype == torch.float32


@pytest.mark.parametrize("schedule, etas", [("constant", [0.1, 0.1, 0.1]),
                                             ("linear", [0.1, 0.075, 0.05]),  # 1 - (t - 1) / 4
                                             ("cosine", [0.1, 0.1 * (1 + 2**-0.5) / 2, 0.05])])
def test_fedadam_server_lr_decays_over_rounds_as_scheduled(schedule, etas):
    settings = Settings(algorithm="fedadam", rounds=4, server_lr=0.1, server_lr_schedule=schedule)
    algorithm = get_algorithm("fedadam", settings)
    x = x0 = torch.tensor([1.0, -2.0, 0.5])
    deltas = [torch.tensor([0.1, 0.0, -0.3]), torch.tensor([-0.2, 0.05, 0.1]), torch.tensor([0.3, -0.1, 0.0])]
    for server_round, delta in enumerate(deltas, start=1):
        x = algorithm.server_update(None, {"w": x + delta}, server_round, {"w": x})[0]["w"]
    torch.testing.assert_close(x, _adam_reference(x0, deltas, etas, 0.9, 0.99, 1e-3))
    if schedule != "constant":  # the decay changes the result (the check can fail)
        assert not torch.allclose(x, _adam_reference(x0, deltas, 0.1, 0.9, 0.99, 1e-3))


def test_fedadam_step_equals_flowers_strategy_bit_for_bit_over_rounds():
    """The pure function against Flower's own FedAdam (the reference implementation), fed the same
    averaged states round after round."""
    import numpy as np
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedAdam as FlowerFedAdam
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

    from fedtune.algorithms.aggregate import fedadam_step

    class Averaged(FlowerFedAvg):
        def aggregate_train(self, server_round, replies):
            return replies, None

    class Reference(FlowerFedAdam, Averaged):
        pass

    flower = Reference(eta=0.05, eta_l=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)
    rng = np.random.default_rng(0)
    current = {"a": rng.standard_normal((3, 2)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    m, v = {}, {}
    for server_round in (1, 2, 3):
        averaged = {k: (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32) for k, x in current.items()}
        flower.current_arrays = {k: x.copy() for k, x in current.items()}
        expected, _ = flower.aggregate_train(server_round, ArrayRecord({k: Array(x) for k, x in averaged.items()}))
        current, m, v = fedadam_step(current, averaged, m, v, server_round, 0.05, 0.9, 0.99, 1e-3, "flower")
        for k in current:
            assert np.array_equal(np.asarray(current[k]), expected[k].numpy()), (server_round, k)
        current = {k: np.asarray(x, dtype=np.float32) for k, x in current.items()}


def test_fedadam_bias_corrections_are_the_named_formulas():
    import numpy as np

    from fedtune.algorithms.aggregate import fedadam_step

    x, avg = {"w": np.array([0.0])}, {"w": np.array([1.0])}  # delta = 1: m = 0.1, v = 0.01 at round 1
    for choice, exponent in (("kingma", 1), ("flower", 2)):
        new, m, v = fedadam_step(x, avg, {}, {}, 1, 0.1, 0.9, 0.99, 0.0, choice)
        eta_t = 0.1 * (1 - 0.99**exponent) ** 0.5 / (1 - 0.9**exponent)
        assert new["w"][0] == pytest.approx(eta_t * 0.1 / 0.1)
    assert new["w"][0] == pytest.approx(0.1 * 0.1411 / 0.19 * 1.0, rel=1e-3)  # Flower at round 1: 0.74 eta
    with pytest.raises(ValueError, match="bias_correction='adam'"):
        fedadam_step(x, avg, {}, {}, 1, 0.1, 0.9, 0.99, 0.0, "adam")
