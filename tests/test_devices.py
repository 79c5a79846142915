"""Device and precision resolution, and that every compute path honours them (on CPU: CI has no GPU)."""

import json

import pytest
import torch

from fedtune.config import Settings
from fedtune.devices import autocast, resolve_device, resolve_precision


def test_explicit_and_missing_devices(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='cuda' was asked for, but this machine has 0 CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="MPS .* is not available"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="device='gpu' is not a device"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"device='cuda:1' was asked for, but this machine has 1 CUDA"):
        resolve_device("cuda:1")


def test_auto_precision_is_bf16_only_on_a_cpu_where_bf16_measured_faster(monkeypatch, tmp_path):
    import fedtune.devices as devices

    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    speeds = {torch.float32: 100.0, torch.bfloat16: 149.0}
    monkeypatch.setattr(devices, "matmul_speeds", lambda dtypes, *a, **k: {d: speeds[d] for d in dtypes})
    devices._probe.cache_clear()
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"  # 1.49x: below the 1.5x margin
    saved = json.loads((tmp_path / "cpu-precision.json").read_text())
    assert saved["fp32_gflops"] == 100.0 and saved["bf16_gflops"] == 149.0
    # Every later process reads the saved measurement instead of measuring again (they agree).
    speeds[torch.bfloat16] = 400.0
    devices._probe.cache_clear()
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    (tmp_path / "cpu-precision.json").write_text("{not json")  # damaged: measured again
    devices._probe.cache_clear()
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"  # 4x (AMX-like)
    assert json.loads((tmp_path / "cpu-precision.json").read_text())["bf16_gflops"] == 400.0
    devices._probe.cache_clear()


def test_auto_precision_keeps_smollm2_in_fp32_where_bf16_pays(monkeypatch):
    import fedtune.devices as devices
    import fedtune.grid as grid

    monkeypatch.setattr(devices, "cpu_bf16_pays", lambda: True)
    devices.compute.cache_clear()  # resolved with the real probe by earlier tests
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, ("minilm",)) == "bf16"
    for models in (("smollm2",), ("HuggingFaceTB/SmolLM2-135M-Instruct",), ("smollm2", "minilm"),
                   ("minilm", "smollm2")):
        assert resolve_precision("auto", cpu, models) == "fp32"  # the teacher or the student
    assert resolve_precision("bf16", cpu, ("smollm2",)) == "bf16"  # asked for: kept
    assert Settings(model="smollm2", student="minilm").models == ("smollm2", "minilm")
    assert grid.training_precision(Settings(model="smollm2")) == "fp32"
    assert grid.training_precision(Settings(student="smollm2")) == "fp32"
    assert grid.training_precision(Settings()) == "bf16"
    devices.compute.cache_clear()


def test_the_probe_times_the_dtypes_in_turn_so_a_load_slows_both_alike(monkeypatch):
    import fedtune.devices as devices

    # A fake clock and matmul: each matmul takes 1 ms of its dtype's work (bf16 twice as fast), and
    # a load arriving after the first 40 ms triples every matmul's time. Timed in turn, both see
    # the unloaded start as well as the loaded rest, so the ratio stays 2.
    clock, calls = [0.0], []

    def mm(a, b):
        calls.append(a.dtype)
        slow = 3.0 if clock[0] > 0.04 else 1.0
        clock[0] += slow * (0.001 if a.dtype == torch.float32 else 0.0005)

    monkeypatch.setattr(devices.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(devices.torch, "mm", mm)
    speeds = devices.matmul_speeds((torch.float32, torch.bfloat16), shape=(10, 10, 10), seconds=0.2)
    assert calls[2:8] == [torch.float32, torch.bfloat16] * 3  # after one warm-up call each: in turn
    assert speeds[torch.bfloat16] / speeds[torch.float32] == pytest.approx(2.0)
    assert speeds[torch.float32] == pytest.approx(2 * 10 ** 3 / 0.001 / 1e9)


def test_a_cell_key_names_the_precision_it_computes_in(monkeypatch):
    import fedtune.grid as grid

    fp32 = grid.Cell("Fed-LoRA", Settings(precision="fp32"), False).key
    monkeypatch.setattr(grid, "training_precision", lambda s: "fp32")
    assert grid.Cell("Fed-LoRA", Settings(), False).key == fp32  # auto resolved to fp32: the same cell
    monkeypatch.setattr(grid, "training_precision", lambda s: "bf16")
    assert grid.Cell("Fed-LoRA", Settings(), False).key != fp32  # auto resolved to bf16: another cell
    assert grid.Cell("Fed-LoRA", Settings(), False).key == grid.Cell("Fed-LoRA", Settings(precision="bf16"), False).key


def test_precision_defaults_to_fp32_on_cuda(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    # auto is fp32 on CUDA too (bf16 measured slower for MiniLM on an H200); bf16 and fp16 are asked for
    assert resolve_precision("auto", cuda) == "fp32" and resolve_precision("fp16", cuda) == "fp16"
    assert resolve_precision("bf16", cuda) == "bf16"
    with pytest.raises(ValueError, match="precision=fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision='fp8'"):
        Settings(precision="fp8")


def test_a_missing_device_fails_before_anything_starts(tiny_bert, glue_dir, tmp_path, monkeypatch):
    from fedtune.simulation import run_federated

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, device="cuda", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="CUDA device"):
        run_federated(settings, quiet=True)
    assert not list(tmp_path.iterdir())


def _linear_output_dtypes(model, run) -> set:
    seen = set()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype)) for m in model.modules()
             if isinstance(m, torch.nn.Linear)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_client_training_and_server_evaluation_compute_in_the_precision_asked(tiny_bert, glue_dir, tmp_path,
                                                                              precision, dtype):
    from fedtune.algorithms import get_algorithm
    from fedtune.local import cached_model, client_update, evaluate_state, initial_state

    settings = Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=2, train_limit=40,
                        eval_limit=16, batch_size=8, max_length=32, local_steps=2, lora_r=2, device="cpu",
                        precision=precision, out_dir=str(tmp_path))
    algorithm = get_algorithm("fedlora", settings)
    state = initial_state(algorithm)
    model = cached_model(algorithm, settings)
    assert _linear_output_dtypes(model, lambda: client_update(algorithm, 0, 2, state, 1, 1e-3)) == {dtype}
    # A run's final evaluation on CPU is fp32 whatever the training precision (an export evaluated
    # elsewhere agrees); the rounds' along the way are in the training precision
    assert _linear_output_dtypes(model, lambda: evaluate_state(algorithm, state)) == {torch.float32}
    assert _linear_output_dtypes(model, lambda: evaluate_state(algorithm, state, final=False)) == {dtype}
    result = client_update(algorithm, 0, 2, state, 1, 1e-3)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in result.state.values())  # what travels


def test_centralized_on_cpu_explicitly_equals_the_default(tiny_bert, glue_dir, tmp_path):
    from fedtune.centralized import run_centralized

    settings = Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, train_limit=32, eval_limit=16,
                        batch_size=8, max_length=32, epochs=1, lora_r=2, method="lora", out_dir=str(tmp_path))
    default = run_centralized(settings, quiet=True)
    auto = resolve_precision("auto", torch.device("cpu"))  # what this CPU measured: bf16 or fp32
    explicit = run_centralized(settings.replace(device="cpu", precision=auto), quiet=True)
    assert (json.loads((default / "summary.json").read_text())["dev"]
            == json.loads((explicit / "summary.json").read_text())["dev"])


def test_autocast_is_off_for_fp32():
    with autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu")


def test_a_bf16_run_evaluates_its_rounds_in_bf16_and_reports_an_fp32_final_evaluation(tiny_bert, glue_dir, tmp_path,
                                                                                      monkeypatch):
    """Rounds 0 .. R-1 and each centralized epoch before the last are evaluated in the training
    precision; the last one, which the run reports and its export must reproduce, in fp32."""
    from fedtune import centralized, local
    from fedtune.centralized import run_centralized
    from fedtune.simulation import run_federated

    seen = []

    def recording(model, loader, task, precision="fp32"):
        seen.append(precision)
        return evaluate(model, loader, task, precision)

    evaluate = local.evaluate
    monkeypatch.setattr(local, "evaluate", recording)
    monkeypatch.setattr(centralized, "evaluate", recording)
    settings = Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=3, train_limit=40,
                        eval_limit=16, batch_size=8, max_length=32, local_steps=1, lora_r=2, device="cpu",
                        precision="bf16", engine="local", out_dir=str(tmp_path))
    run = run_federated(settings, quiet=True)
    assert seen == ["bf16", "bf16", "bf16", "fp32"]  # rounds 0, 1, 2; the last round, 3
    final = [r for r in map(json.loads, (run / "rounds.jsonl").read_text().splitlines())][-1]
    assert json.loads((run / "summary.json").read_text())["dev"]["accuracy"] == final["dev_accuracy"]
    seen.clear()
    run_centralized(settings.replace(method="lora", epochs=2), quiet=True)
    assert seen == ["bf16", "fp32"]  # epoch 1; epoch 2, the end
    seen.clear()
    run_federated(settings.replace(precision="fp32", rounds=1, out_dir=str(tmp_path / "fp32")), quiet=True)
    assert seen == ["fp32", "fp32"]
