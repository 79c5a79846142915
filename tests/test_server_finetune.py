"""The server-data baseline: `server-finetune-steps` trains the aggregated model on the public slice."""

import json

import pytest
import torch

from fedtune.algorithms import get_algorithm
from fedtune.config import Settings
from fedtune.local import cached_model, initial_state
from fedtune.runs import read_jsonl
from fedtune.simulation import run_federated


@pytest.fixture(scope="module")
def base(tiny_bert, glue_dir, tmp_path_factory):
    return Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=2, train_limit=40,
                    eval_limit=16, batch_size=8, max_length=32, local_steps=1, lora_r=2, engine="local",
                    out_dir=str(tmp_path_factory.mktemp("runs")))


def test_after_aggregation_is_server_update_then_the_public_slice_steps(base):
    plain = get_algorithm("fedlora", base)
    state = initial_state(plain)
    model = cached_model(plain, plain.server_settings())  # the server's model, as the runtime passes it
    same, metrics = plain.after_aggregation(model, state, 1, state)
    assert metrics == {} and all(torch.equal(same[k], state[k]) for k in state)  # 0 steps: untouched
    tuned = get_algorithm("fedlora", base.replace(server_finetune_steps=3))
    changed, metrics = tuned.after_aggregation(model, state, 1, state)
    assert metrics["server_finetune_loss"] > 0 and changed.keys() == state.keys()
    assert any(not torch.equal(changed[k], state[k]) for k in state)
    again, _ = get_algorithm("fedlora", base.replace(server_finetune_steps=3)).after_aggregation(model, state, 1, state)
    assert all(torch.equal(again[k], changed[k]) for k in state)  # seeded: the same steps


def test_a_run_with_server_data_says_so(base):
    path = run_federated(base.replace(server_finetune_steps=2), quiet=True)
    rounds = read_jsonl(path / "rounds.jsonl")
    assert all(r["server_finetune_loss"] > 0 for r in rounds[1:])
    assert json.loads((path / "summary.json").read_text())["server_data"] is True
    for placement in ("server", "client"):  # the teacher is fine-tuned on the public slice by the server
        assert get_algorithm("fedkdlora", base.replace(algorithm="fedkdlora", kd_placement=placement)).uses_server_data
    assert not get_algorithm("fedlora", base).uses_server_data
    with pytest.raises(ValueError, match="server-finetune-steps=0"):
        get_algorithm("fedex-lora", base.replace(algorithm="fedex-lora", server_finetune_steps=1))
