"""End to end through the apps: tiny model, real CoLA rows, 3 clients, 2 rounds. The runs use the
in-process engine (`--engine local`, the same ServerApp and ClientApp without Ray, about 3x
faster); Flower's Ray simulation engine runs where it is the subject: the engines give equal
rounds, and SecAgg+ over Ray's grid."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune.config import Settings
from fedtune.runs import read_jsonl
from fedtune.simulation import run_federated

pytestmark = pytest.mark.slow  # the full tier (FULL=1 bash scripts/test.sh)


@pytest.fixture(scope="module")
def base(tiny_bert, glue_dir, tmp_path_factory):
    return Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=3, rounds=2, train_limit=90,
                    eval_limit=48, batch_size=8, max_length=32, local_steps=2, lora_r=4,
                    full_lr=1e-3, partition="dirichlet", dirichlet_alpha=1.0, precision="fp32", engine="local",
                    out_dir=str(tmp_path_factory.mktemp("runs")))  # fp32: the SecAgg+ error bound below is fp32's


@pytest.fixture(scope="module")
def runs(base):
    return {name: run_federated(base.replace(algorithm=name), quiet=True)
            for name in ("fedavg", "fedlora", "ffa-lora", "fedprox", "fedadam")} | {
        "fedlora-again": run_federated(base.replace(algorithm="fedlora"), quiet=True),
        **{name: run_federated(base.replace(algorithm=name, client_ranks="2,4,8"), quiet=True)
           for name in ("flexlora", "hetlora", "flora")},
        "fedex-lora": run_federated(base.replace(algorithm="fedex-lora"), quiet=True),
        "fedavg-int8": run_federated(base.replace(algorithm="fedavg", codec="int8"), quiet=True),
        **{f"fedkdlora-{placement}": run_federated(base.replace(algorithm="fedkdlora", kd_placement=placement,
                                                                teacher_epochs=0.05, codec=codec), quiet=True)
           for placement, codec in (("server", "int8"), ("client", "none"))},
        "faulty": run_federated(base.replace(algorithm="fedlora", aggregation="median", dropout=0.4), quiet=True),
        **{f"{name}-secagg": run_federated(base.replace(algorithm=name, secure_aggregation="secagg+", engine=engine),
                                           quiet=True)
           for name, engine in (("fedavg", "local"), ("fedlora", "ray"))},  # SecAgg+ over both engines' grids
        "secagg-faulty": run_federated(base.replace(algorithm="fedlora", secure_aggregation="secagg+", dropout=0.5),
                                       quiet=True)}


@pytest.mark.parametrize("name", ["fedavg", "fedlora", "flexlora", "hetlora", "fedkdlora-server", "fedkdlora-client",
                                  "ffa-lora", "fedprox", "fedadam", "fedex-lora", "flora"])
def test_run_folder_is_complete(runs, name):
    path = runs[name]
    assert not path.name.endswith(".incomplete")
    for filename in ("config.json", "rounds.jsonl", "summary.json", "partitions.json", "metrics.png", "partitions.png"):
        assert (path / filename).is_file(), filename
    rounds = read_jsonl(path / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(0.0 <= r["dev_accuracy"] <= 1.0 and "dev_mcc" in r for r in rounds)
    assert rounds[0]["bytes_up"] == 0 and rounds[2]["cum_bytes_up"] == rounds[1]["bytes_up"] + rounds[2]["bytes_up"]
    partitions = json.loads((path / "partitions.json").read_text())
    assert sum(p["size"] for p in partitions) == 90


@pytest.mark.parametrize("name", ["fedavg", "fedlora", "ffa-lora"])
def test_bytes_per_round_are_the_travelling_state_times_clients(runs, name):
    rounds = read_jsonl(runs[name] / "rounds.jsonl")
    payload = rounds[1]["travelling_parameters"] * 4 * 3  # float32, 3 clients
    # Tensors plus a few KB of headers and names. Flower sends identical arrays once per message, so
    # round 1's download (LoRA B starts as zeros everywhere) may be smaller; trained states are not.
    for r in rounds[1:]:
        assert payload <= r["bytes_up"] <= payload * 1.01 + 30_000, r["bytes_up"]
        assert r["bytes_down"] <= payload * 1.01 + 30_000, r["bytes_down"]
    assert payload <= rounds[2]["bytes_down"]


@pytest.mark.parametrize("name", ["fedlora", "fedlora-secagg"])
def test_a_round_records_its_clients_training_and_its_evaluation_time(runs, name):
    """The parts of a round's wall time that are not overhead (the benchmarks subtract them)."""
    rounds = read_jsonl(runs[name] / "rounds.jsonl")
    assert rounds[0]["client_train_seconds"] == 0.0 and rounds[0]["eval_seconds"] > 0  # round 0 evaluates only
    for r in rounds[1:]:
        assert 0 < r["client_train_seconds"] and 0 < r["eval_seconds"]
        assert r["client_train_seconds"] + r["eval_seconds"] + r["aggregate_seconds"] < r["seconds"]


def test_fedlora_uplink_is_far_below_fedavg(runs):
    up = {name: read_jsonl(runs[name] / "rounds.jsonl")[1]["bytes_up"] for name in ("fedavg", "fedlora")}
    assert up["fedlora"] < 0.05 * up["fedavg"]


def test_global_model_changed(runs, tiny_bert):
    initial = load_file(f"{tiny_bert}/model.safetensors")
    final = load_file(str(runs["fedavg"] / "model" / "model.safetensors"))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(initial[name.removeprefix("bert.")], final[name])
    adapter = load_file(str(runs["fedlora"] / "model" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at zero


def test_same_seed_same_rounds(runs):
    """Identical metrics; byte counts agree up to the varint size of Flower's random run/node ids."""
    first = read_jsonl(runs["fedlora"] / "rounds.jsonl")
    again = read_jsonl(runs["fedlora-again"] / "rounds.jsonl")
    ignored = ("seconds", "elapsed", "bytes")
    strip = lambda rs: [{k: v for k, v in r.items() if not any(word in k for word in ignored)} for r in rs]
    assert strip(first) == strip(again)
    for a, b in zip(first, again):
        assert abs(a["bytes_up"] - b["bytes_up"]) <= 3 * 16 and abs(a["bytes_down"] - b["bytes_down"]) <= 3 * 16


def test_flexlora_sends_each_client_its_own_rank(runs):
    partitions = json.loads((runs["flexlora"] / "partitions.json").read_text())
    assert [p["lora-r"] for p in partitions] == [2, 4, 8]
    # The server keeps rank 2 + 4 + 8 = 14; the adapter it saves has that rank.
    adapter = load_file(str(runs["flexlora"] / "model" / "adapter_model.safetensors"))
    a = next(v for k, v in adapter.items() if "lora_A" in k)
    assert a.shape[0] == 14
    # Uplink: each client sends its head plus LoRA at its own rank, 2 + 4 + 8 = 14 rank units in all
    # (tiny BERT: 4 layers x 2 modules, in = out = 32, so one rank unit is 64 floats per module).
    rounds = read_jsonl(runs["flexlora"] / "rounds.jsonl")
    head = read_jsonl(runs["fedlora"] / "rounds.jsonl")[1]["travelling_parameters"] - 8 * 64 * 4  # FedLoRA r=4
    expected_params = 3 * head + 8 * 64 * 14
    assert expected_params * 4 <= rounds[1]["bytes_up"] <= expected_params * 4 * 1.01 + 30_000


@pytest.mark.parametrize("placement", ["server", "client"])
def test_fedkdlora_reports_teacher_and_student_every_round(runs, placement):
    rounds = read_jsonl(runs[f"fedkdlora-{placement}"] / "rounds.jsonl")
    for r in rounds:  # round 0: the pre-trained teacher; then the teacher(s) after each round
        assert {"dev_accuracy", "dev_mcc", "teacher_dev_accuracy", "teacher_dev_mcc", "teacher_dev_loss"} <= set(r)
    summary = json.loads((runs[f"fedkdlora-{placement}"] / "summary.json").read_text())
    assert summary["kd_placement"] == placement and summary["teacher_dev"]["accuracy"] == rounds[-1]["teacher_dev_accuracy"]


def test_fedkdlora_student_sends_less_than_fedlora(runs):
    """Only the student (half the blocks) travels."""
    up = {name: read_jsonl(runs[name] / "rounds.jsonl")[2]["bytes_up"] for name in ("fedlora", "fedkdlora-client")}
    assert up["fedkdlora-client"] < up["fedlora"]
    summaries = {name: json.loads((runs[name] / "summary.json").read_text()) for name in ("fedlora", "fedkdlora-server")}
    assert summaries["fedkdlora-server"]["codec"] == "int8"
    assert summaries["fedkdlora-server"]["travelling_parameters"] < 0.6 * summaries["fedlora"]["travelling_parameters"]


def test_int8_codec_sends_a_quarter_of_the_bytes(runs):
    fp32, int8 = (read_jsonl(runs[name] / "rounds.jsonl")[2] for name in ("fedavg", "fedavg-int8"))
    payload = fp32["travelling_parameters"] * 3  # one byte per parameter, 3 clients
    assert payload <= int8["bytes_up"] <= 0.3 * fp32["bytes_up"]
    assert int8["bytes_down"] == pytest.approx(fp32["bytes_down"], rel=1e-3)  # the download stays fp32


def test_dropped_clients_are_skipped_and_the_rounds_complete(runs, base):
    from fedtune.local import simulated_failure

    rounds = read_jsonl(runs["faulty"] / "rounds.jsonl")
    for r in rounds[1:]:
        failing = [p for p in r["clients"] if simulated_failure(base.replace(dropout=0.4), r["round"], p)]
        assert len(r["dropped"]) == len(failing) and r["accepted"] == len(r["clients"]) - len(failing)
        assert all("simulated dropout" in d["reason"] for d in r["dropped"])
    assert sum(len(r["dropped"]) for r in rounds) > 0  # seed 42 drops someone: the test exercises the path
    assert json.loads((runs["faulty"] / "summary.json").read_text())["rounds"] == 2


def test_resume_after_a_crash_gives_the_uninterrupted_result(runs, base, monkeypatch):
    """Crash the server right after round 1's checkpoint; `resume` finishes round 2 with the same
    metrics and model as the run that never stopped (FedKDLoRA, teachers kept on the clients' disk)."""
    import fedtune.checkpoint

    settings = base.replace(algorithm="fedkdlora", kd_placement="client", teacher_epochs=0.05)
    real_save = fedtune.checkpoint.save

    def save_then_crash(folder, state, algorithm_state, records, *args):
        real_save(folder, state, algorithm_state, records, *args)
        if records[-1]["round"] == 1:
            raise RuntimeError("simulated kill after round 1")

    monkeypatch.setattr(fedtune.checkpoint, "save", save_then_crash)
    with pytest.raises(RuntimeError):
        run_federated(settings, quiet=True)
    monkeypatch.setattr(fedtune.checkpoint, "save", real_save)
    [interrupted] = [p for p in (runs["faulty"].parent).glob("fedkdlora-cola-*.incomplete")]
    assert [r["round"] for r in read_jsonl(interrupted / "rounds.jsonl")] == [0, 1]

    resumed = run_federated(settings.replace(resume=str(interrupted)), quiet=True)
    assert resumed.name == interrupted.name.removesuffix(".incomplete") and not (resumed / "checkpoint.safetensors").exists()
    ignored = ("seconds", "elapsed", "bytes")
    strip = lambda rs: [{k: v for k, v in r.items() if not any(w in k for w in ignored)} for r in rs]
    assert strip(read_jsonl(resumed / "rounds.jsonl")) == strip(read_jsonl(runs["fedkdlora-client"] / "rounds.jsonl"))
    final = load_file(str(resumed / "model" / "model.safetensors"))
    reference = load_file(str(runs["fedkdlora-client"] / "model" / "model.safetensors"))
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)


def test_resume_refuses_finished_runs_and_changed_settings(runs, base):
    with pytest.raises(ValueError, match="finished runs cannot be resumed"):
        run_federated(base.replace(algorithm="fedlora", resume=str(runs["fedlora"])), quiet=True)


@pytest.mark.parametrize("name", ["fedavg", "fedlora"])
def test_secure_aggregate_equals_the_plain_one_within_quantization(runs, base, name):
    """SecAgg+ quantizes each weighted update to steps of 2 * clip / 2**22; the rest is exact."""
    filename = "model.safetensors" if name == "fedavg" else "adapter_model.safetensors"
    plain = load_file(str(runs[name] / "model" / filename))
    secure = load_file(str(runs[f"{name}-secagg"] / "model" / filename))
    assert plain.keys() == secure.keys()
    sizes = [p["size"] for p in json.loads((runs[f"{name}-secagg"] / "partitions.json").read_text())]
    step = 2 * base.secagg_clip / 2**22
    # Per round the mean's error is at most one step per client, scaled by 1 / (sum of size / max size);
    # round 2 trains from round 1's slightly different state, so allow a factor of 10 on top.
    tolerance = 10 * base.rounds * step * len(sizes) * max(sizes) / sum(sizes)
    worst = max((plain[k] - secure[k]).abs().max().item() for k in plain)
    assert 0 < worst <= tolerance, (worst, tolerance)  # > 0: the secure run really quantized
    secure_rounds = read_jsonl(runs[f"{name}-secagg"] / "rounds.jsonl")
    plain_rounds = read_jsonl(runs[name] / "rounds.jsonl")
    assert [r["accepted"] for r in secure_rounds[1:]] == [3, 3]
    # Key exchange, shares and masked int vectors cost more than the plain float32 replies.
    assert all(s["bytes_up"] > p["bytes_up"] for s, p in zip(secure_rounds[1:], plain_rounds[1:]))


def test_secure_rounds_survive_a_client_that_fails_mid_protocol(runs, base):
    """A client raising in the masking stage is dropped by SecAgg+; the others' sum is still unmasked."""
    from fedtune.local import simulated_failure

    rounds = read_jsonl(runs["secagg-faulty"] / "rounds.jsonl")
    for r in rounds[1:]:
        failing = [p for p in r["clients"] if simulated_failure(base.replace(dropout=0.5), r["round"], p)]
        assert r["accepted"] == len(r["clients"]) - len(failing) and len(r["dropped"]) == len(failing)
    assert sum(len(r["dropped"]) for r in rounds) > 0  # seed 42 drops someone in these rounds
    assert rounds[-1]["dev_loss"] != rounds[0]["dev_loss"]  # the surviving clients' mean was applied


def test_ffa_lora_sends_everything_fedlora_sends_but_lora_a(runs):
    fedlora, ffa = (read_jsonl(runs[n] / "rounds.jsonl")[1]["travelling_parameters"] for n in ("fedlora", "ffa-lora"))
    assert fedlora - ffa == 8 * 4 * 32  # tiny BERT: 8 LoRA modules, A is r x in = 4 x 32
    summary = json.loads((runs["ffa-lora"] / "summary.json").read_text())
    assert summary["lora_r"] == 4 and "LoRA A" in summary["frozen"]


def test_fedadam_and_fedprox_change_what_fedlora_learns(runs):
    """Same clients, data and seeds as FedLoRA: the server's Adam step and the proximal term each
    change the trajectory (and mu > 0 is not a no-op)."""
    dev = {n: [r["dev_loss"] for r in read_jsonl(runs[n] / "rounds.jsonl")] for n in ("fedlora", "fedprox", "fedadam")}
    assert dev["fedlora"][0] == dev["fedprox"][0] == dev["fedadam"][0]  # the same initial model
    assert dev["fedprox"][1:] != dev["fedlora"][1:] and dev["fedadam"][1:] != dev["fedlora"][1:]


def test_exact_aggregation_runs_keep_every_reply_and_count_the_base_updates(runs, tiny_bert):
    fedlora = read_jsonl(runs["fedlora"] / "rounds.jsonl")
    for name in ("fedex-lora", "flora"):
        rounds = read_jsonl(runs[name] / "rounds.jsonl")
        assert all(r["accepted"] == 3 and not r["dropped"] for r in rounds[1:]), name  # no client missed an update
        # Round 2's messages carry round 1's base update: per module and client, FedEx's residual has
        # rank (3 clients + 1) x 4 and FLoRA's stack rank 2 + 4 + 8, each (32 + 32) floats wide.
        rank = {"fedex-lora": 4 * 4, "flora": 2 + 4 + 8}[name]
        extra = 3 * 8 * rank * 64 * 4  # 3 messages, 8 modules, float32
        assert rounds[2]["bytes_down"] > extra
        if name == "fedex-lora":  # otherwise FedLoRA's message
            assert extra <= rounds[2]["bytes_down"] - fedlora[2]["bytes_down"] <= extra * 1.02 + 30_000
    # The export is a plain transformers model (the base updates and the LoRA merged in).
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(runs["fedex-lora"] / "model")
    assert not any("lora" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("name", ["fedavg", "fedlora", "flexlora", "hetlora", "fedkdlora-server", "fedkdlora-client",
                                  "ffa-lora", "fedprox", "fedadam", "fedex-lora", "flora"])
def test_export_loads_without_fedtune_and_gives_the_reported_metrics(runs, name, glue_dir, evaluate_export):
    reported = json.loads((runs[name] / "summary.json").read_text())["dev"]
    measured = evaluate_export(runs[name], glue_dir)
    assert measured["accuracy"] == reported["accuracy"] and measured["mcc"] == pytest.approx(reported["mcc"], abs=1e-12)
    assert measured["loss"] == pytest.approx(reported["loss"], abs=1e-5)


@pytest.mark.parametrize("name", ["fedlora", "fedkdlora-client"])
def test_the_local_engine_gives_the_ray_engines_rounds(runs, base, name):
    """The same apps in one process, no Ray: identical per-round metrics for the same seed on CPU
    (bytes differ by a few per message: node ids are varints of different lengths)."""
    changes = {"algorithm": "fedkdlora", "kd_placement": "client", "teacher_epochs": 0.05} if name != "fedlora" else {}
    ray = read_jsonl(run_federated(base.replace(engine="ray", **changes), quiet=True) / "rounds.jsonl")
    local = read_jsonl(runs[name] / "rounds.jsonl")
    ignored = ("seconds", "elapsed", "bytes", "clients", "dropped")
    strip = lambda rs: [{k: v for k, v in r.items() if not any(w in k for w in ignored)} for r in rs]  # noqa: E731
    assert strip(local) == strip(ray)
    for a, b in zip(local, ray):
        assert abs(a["bytes_up"] - b["bytes_up"]) <= 3 * 32 and abs(a["bytes_down"] - b["bytes_down"]) <= 3 * 32
        assert a["clients"] == b["clients"] and a["accepted"] == b["accepted"]
