"""On a CUDA GPU: training, evaluation and a federated run compute there and hand back CPU fp32 states.

Skipped where CUDA is absent (CI, this project's CPU machines); `python -m benchmarks.gpu` runs them
on a GPU machine. FEDTUNE_TEST_DEVICE=cpu runs the same checks on the CPU (to check the tests).
"""

import json
import os

import pytest
import torch

from fedtune.config import Settings

DEVICE = os.environ.get("FEDTUNE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def base(tiny_bert, glue_dir, tmp_path_factory):
    return Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=2, train_limit=64,
                    eval_limit=32, batch_size=8, max_length=32, local_steps=2, lora_r=4, device=DEVICE,
                    out_dir=str(tmp_path_factory.mktemp("runs")))


@pytest.mark.parametrize("precision", ["fp32", "bf16"] + (["fp16"] if DEVICE.startswith("cuda") else []))
def test_client_training_on_the_device_returns_cpu_fp32_states(base, precision):
    from fedtune.algorithms import get_algorithm
    from fedtune.local import cached_model, client_update, initial_state

    algorithm = get_algorithm("fedlora", base.replace(precision=precision))
    start = initial_state(algorithm)
    result = client_update(algorithm, 0, 2, start, server_round=1, lr=1e-2)
    assert next(cached_model(algorithm, algorithm.client_settings(0)).parameters()).device.type == DEVICE.split(":")[0]
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in result.state.values())
    assert any(not torch.equal(result.state[k], start[k]) for k in start)  # it trained
    assert torch.isfinite(torch.tensor(result.train_loss))


def test_fp32_training_on_the_device_matches_the_cpu(base):
    """The same seed and batches: the device's fp32 kernels agree with the CPU's to rounding. Dropout
    off: CPU and CUDA draw their masks from different generators."""
    from fedtune.algorithms import get_algorithm
    from fedtune.local import client_update, initial_state

    states = []
    for device in ("cpu", DEVICE):
        algorithm = get_algorithm("fedlora", base.replace(device=device, precision="fp32", model_dropout=0.0))
        states.append(client_update(algorithm, 0, 2, initial_state(algorithm), server_round=1, lr=1e-2).state)
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], atol=1e-4, rtol=1e-3)


def test_a_federated_run_on_the_local_engine_uses_the_device(base):
    from fedtune.simulation import run_federated

    path = run_federated(base.replace(algorithm="fedlora", engine="local"), quiet=True)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["settings"]["device"] == DEVICE and 0.0 <= summary["dev"]["accuracy"] <= 1.0
    assert (path / "model" / "adapter_model.safetensors").is_file()
