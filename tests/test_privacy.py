"""Client-level DP: clients clip their update (Flower's mod); epsilon comes from Flower's RDP accountant."""

import dp_accounting
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedtune.algorithms import get_algorithm
from fedtune.client_app import make_client_app
from fedtune.config import Settings
from fedtune.local import initial_state
from fedtune.privacy import PrivacyLedger
from fedtune.strategy import FedTuneStrategy


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("clip", [None, 0.01])
def test_clients_clip_their_update_when_asked(tiny_bert, glue_dir, tmp_path, clip):
    settings = Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=2, train_limit=40,
                        eval_limit=16, batch_size=8, max_length=32, local_steps=3, lora_r=2, lora_lr=1e-2,
                        out_dir=str(tmp_path))
    sent = initial_state(get_algorithm("fedlora", settings))
    config = {"server-round": 1, "lr": 1e-2, "run-name": "dp-test"}
    if clip is not None:
        config[KEY_CLIPPING_NORM] = clip
    message = Message(RecordDict({"arrays": ArrayRecord(sent), "config": ConfigRecord(config)}), dst_node_id=1,
                      message_type="train")
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    reply = make_client_app(settings)(message, context)
    new = reply.content["arrays"].to_torch_state_dict()
    norm = torch.sqrt(sum(((new[k].double() - sent[k].double()) ** 2).sum() for k in sent)).item()
    if clip is None:
        assert norm > 0.05  # three steps at lr 1e-2 move the adapters and head much further
    else:
        assert norm == pytest.approx(clip, rel=1e-3)


@pytest.mark.parametrize("sampled", [4, 2])
def test_epsilon_matches_the_rdp_accountant(sampled):
    settings = Settings(clients=4, dp_noise=1.1, dp_delta=1e-5)
    ledger = PrivacyLedger(settings, sampled)
    spent = [ledger.release() for _ in range(3)]
    assert spent[0] < spent[1] < spent[2]
    gaussian = dp_accounting.GaussianDpEvent(1.1)
    if sampled == 4:  # everyone, every round: plain composition of Gaussian releases
        reference = dp_accounting.rdp.RdpAccountant()
    else:  # 2 of 4 sampled without replacement; neighbours differ by replacing one client
        reference = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        gaussian = dp_accounting.SampledWithoutReplacementDpEvent(4, 2, gaussian)
    reference.compose(gaussian, 3)
    assert spent[2] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6)


def test_dp_needs_same_shape_updates_and_plain_codec():
    with pytest.raises(ValueError, match="needs dp-noise=0"):  # the algorithm refuses it, before any strategy
        get_algorithm("flexlora", Settings(algorithm="flexlora", dp_noise=1.0))
    with pytest.raises(ValueError, match="codec=none"):
        Settings(dp_noise=1.0, codec="int8")


@pytest.mark.slow
def test_private_fedlora_reports_epsilon_every_round(tiny_bert, glue_dir, tmp_path):
    from fedtune.runs import read_jsonl
    from fedtune.simulation import run_federated

    settings = Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=2, train_limit=40,
                        eval_limit=16, batch_size=8, max_length=32, local_steps=2, lora_r=2, out_dir=str(tmp_path),
                        dp_noise=0.8, dp_clip=0.05)
    rounds = read_jsonl(run_federated(settings, quiet=True) / "rounds.jsonl")
    ledger = PrivacyLedger(settings, sampled=2)
    assert [r["dp_epsilon"] for r in rounds[1:]] == pytest.approx([ledger.release(), ledger.release()])
    assert "dp_epsilon" not in rounds[0] and all(r["accepted"] == 2 for r in rounds[1:])


def test_secure_aggregation_refuses_mixed_shapes_and_a_single_client():
    nodes = {0: 101, 1: 102}
    with pytest.raises(ValueError, match="needs secure-aggregation=none"):
        get_algorithm("flexlora", Settings(algorithm="flexlora", clients=2, client_ranks="2,4",
                                           secure_aggregation="secagg+"))
    fedlora = get_algorithm("fedlora", Settings(algorithm="fedlora", clients=2))
    with pytest.raises(ValueError, match="at least 2 sampled clients"):  # SecAgg+ needs someone to hide among
        FedTuneStrategy(fedlora, nodes, 0.5, 0, lambda r: 1e-3, secagg=(8.0, 100))
