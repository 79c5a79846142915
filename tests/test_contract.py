"""Contract tests over the registry: every registered algorithm, on a tiny model and the local
engine, runs, accounts its bytes, and (full tier) resumes to the uninterrupted run's result.
A new algorithm is covered by registering it."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune.algorithms import get_algorithm, registered
from fedtune.config import Settings
from fedtune.runs import read_jsonl
from fedtune.simulation import run_federated
from tests.conftest import comparable_rounds

ALGORITHMS = list(registered())


@pytest.fixture(scope="module")
def base(tiny_bert, glue_dir, tmp_path_factory):
    return Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=2, train_limit=40,
                    eval_limit=16, batch_size=8, max_length=32, local_steps=1, lora_r=2, client_ranks="2,4",
                    teacher_epochs=0.05, engine="local", out_dir=str(tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="module")
def finished(base):
    """One finished two-round run per algorithm (made on first use)."""
    done = {}

    def get(name: str):
        if name not in done:
            done[name] = run_federated(base.replace(algorithm=name), quiet=True)
        return done[name]

    return get


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_runs_and_accounts_its_rounds_and_bytes(finished, base, name):
    path = finished(name)
    rounds = read_jsonl(path / "rounds.jsonl")
    summary = json.loads((path / "summary.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2] and all(r["accepted"] == 2 for r in rounds[1:])
    assert summary["failed_rounds"] == 0 and summary["algorithm"] == name
    assert {"accuracy", "mcc", "auc", "balanced_accuracy", "worst_class_recall"} <= set(summary["dev"])
    assert summary["total_bytes_up"] == sum(r["bytes_up"] for r in rounds)
    if get_algorithm(name, base).same_shape_updates:
        # every client sends its whole trainable state as fp32, plus a few KB of names and headers
        payload = rounds[1]["travelling_parameters"] * 4 * base.clients
        assert all(payload <= r["bytes_up"] <= payload * 1.01 + 30_000 for r in rounds[1:]), rounds
    assert not (path / "checkpoint.safetensors").exists() and (path / "model").is_dir()


def _model_files(path):
    return {f.name: load_file(str(f)) for f in (path / "model").glob("*.safetensors")}


def _keeps_server_state(name: str) -> bool:
    from fedtune.algorithms.base import Algorithm

    return type(get_algorithm(name, Settings(algorithm=name))).checkpoint_state is not Algorithm.checkpoint_state


# Round 0's checkpoint is written before any server state exists: resumed from there too by every
# algorithm that keeps some (FedAdam's moments, the merged updates, FedKDLoRA's teacher).
RESUMES = [(name, 1) for name in ALGORITHMS] + [(name, 0) for name in ALGORITHMS if _keeps_server_state(name)]


@pytest.mark.slow
@pytest.mark.parametrize("name, round_", RESUMES)
def test_a_resume_gives_the_uninterrupted_result(finished, base, name, round_, resumed_run):
    """Killed right after round 1's (or round 0's) checkpoint, then resumed: the same rounds and
    model (server state such as FedAdam's moments is in the checkpoint; client state on the
    clients' disk)."""

    reference = finished(name)
    resumed = resumed_run(base.replace(algorithm=name, out_dir=str(reference.parent / f"resume-{round_}-{name}")),
                          round_)
    ignored = ("seconds", "elapsed", "bytes")
    assert comparable_rounds(resumed, ignored) == comparable_rounds(reference, ignored)
    got, want = _model_files(resumed), _model_files(reference)
    assert got.keys() == want.keys()
    for filename in want:
        assert got[filename].keys() == want[filename].keys()
        assert all(torch.equal(got[filename][k], want[filename][k]) for k in want[filename]), filename
