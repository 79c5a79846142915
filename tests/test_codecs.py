"""Update codecs: SVD truncation error, quantization error, round trips, and the strategy decoding them."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune.algorithms import get_algorithm
from fedtune.codecs import LAYOUT, Broadcast, Codec, decode_broadcast, encode_broadcast, svd_energy, svd_truncate
from fedtune.comm import wire_bytes
from fedtune.config import Settings
from fedtune.runs import read_jsonl
from fedtune.simulation import run_federated
from fedtune.strategy import FedTuneStrategy


def test_svd_truncation_error_is_the_discarded_energy():
    torch.manual_seed(0)
    matrix = torch.randn(40, 12) @ torch.diag(torch.logspace(0, -2, 12)) @ torch.randn(12, 12)
    sigma = torch.linalg.svdvals(matrix.double())
    energy = (sigma**2).cumsum(0) / (sigma**2).sum()
    U, S, Vh = svd_truncate(matrix, 0.95)
    k = len(S)
    assert energy[k - 1] >= 0.95 and (k == 1 or energy[k - 2] < 0.95)  # the smallest such k
    error = ((matrix.double() - (U * S).double() @ Vh.double()) ** 2).sum()
    assert error.item() == pytest.approx((sigma[k:] ** 2).sum().item(), rel=1e-4)


def test_energy_threshold_moves_linearly_over_rounds():
    assert svd_energy(0.95, 0.98, 1, 4) == pytest.approx(0.95)
    assert svd_energy(0.95, 0.98, 2, 4) == pytest.approx(0.96)
    assert svd_energy(0.95, 0.98, 4, 4) == pytest.approx(0.98)
    assert svd_energy(0.95, 0.98, 1, 1) == pytest.approx(0.98)


def test_low_rank_update_travels_as_factors_and_decodes_exactly():
    torch.manual_seed(1)
    sent = {"w": torch.randn(64, 48), "b": torch.randn(48)}
    update = torch.randn(64, 2) @ torch.randn(2, 48)  # rank 2
    new = {"w": sent["w"] + update, "b": sent["b"] + 1.0}
    codec = Codec("svd", 0.99, 0.99, rounds=3)
    encoded = codec.encode(new, sent, server_round=1)
    assert set(encoded) == {"w@U", "w@S", "w@V", "b"}  # 1-D tensors travel as they are
    assert encoded["w@S"].shape == (2,)
    assert sum(t.numel() for t in encoded.values()) == 2 * (64 + 48 + 1) + 48
    decoded = codec.decode(encoded, sent)
    torch.testing.assert_close(decoded["w"], new["w"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded["b"], new["b"])


def test_full_rank_matrix_is_sent_plain_when_factors_would_be_larger():
    torch.manual_seed(2)
    sent = {"a": torch.zeros(4, 4)}
    encoded = Codec("svd", 1.0, 1.0).encode({"a": torch.randn(4, 4)}, sent, 1)
    assert set(encoded) == {"a"}


@pytest.mark.parametrize("name, dtype, tolerance", [("fp16", torch.float16, 1e-3), ("int8", torch.int8, 1 / 254)])
def test_quantized_update_error_is_bounded(name, dtype, tolerance):
    torch.manual_seed(3)
    sent = {"w": torch.randn(16, 8)}
    new = {"w": sent["w"] + torch.randn(16, 8)}
    codec = Codec(name)
    encoded = codec.encode(new, sent, 1)
    assert encoded[f"w@{name}"].dtype == dtype
    update = new["w"] - sent["w"]
    error = (codec.decode(encoded, sent)["w"] - new["w"]).abs().max()
    # fp16: relative rounding 2^-11; int8: half a step of absmax/127
    assert error <= tolerance * update.abs().max() + 1e-6


def test_none_sends_the_state_itself():
    state = {"w": torch.ones(3)}
    assert Codec("none").encode(state, {"w": torch.zeros(3)}, 1) is state


def test_broken_encodings_name_the_tensor():
    sent = {"w": torch.zeros(4, 3)}
    codec = Codec("svd")
    with pytest.raises(ValueError, match="lacks 'w@S'"):
        codec.decode({"w@U": torch.zeros(4, 1)}, sent)
    with pytest.raises(ValueError, match="w"):
        codec.decode({"w@U": torch.zeros(5, 1), "w@S": torch.ones(1), "w@V": torch.zeros(1, 3)}, sent)
    with pytest.raises(ValueError, match="unexpected"):
        codec.decode({"w": torch.zeros(4, 3), "x@fp16": torch.zeros(1)}, sent)
    with pytest.raises(ValueError, match="unknown codec"):
        Codec("zip")


@pytest.mark.usefixtures("task_identity")
def test_strategy_decodes_updates_and_drops_undecodable_ones():
    codec = Codec("int8")
    strategy = FedTuneStrategy(get_algorithm("fedlora"), {0: 100, 1: 101, 2: 102}, 1.0, 0, lambda r: 0.1, codec)
    strategy.sent = {p: {"w": torch.ones(2)} for p in range(3)}

    def reply(arrays, partition_id):
        TaskIdentity.node_id = 100 + partition_id
        metrics = MetricRecord({"num-examples": 1, "partition-id": partition_id, "train-loss": 0.1,
                                "examples-seen": 1})
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), dst_node_id=0,
                       message_type="train")

    replies = [reply(codec.encode({"w": torch.tensor([3.0, 1.0])}, strategy.sent[0], 1), 0),
               reply(codec.encode({"w": torch.tensor([1.0, 3.0])}, strategy.sent[1], 1), 1),
               reply({"w@int8": torch.tensor([9, 9], dtype=torch.int8)}, 2)]  # no scale: rejected, not averaged
    arrays, _ = strategy.aggregate_train(1, replies)
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], torch.tensor([2.0, 2.0]), atol=0.02, rtol=0)
    stats = strategy.rounds[1]
    assert stats.accepted == 2 and "lacks 'w@scale'" in stats.dropped[0]["reason"]


def _adapter_like_state(seed: int, tensors: int = 40) -> dict[str, torch.Tensor]:
    """Many small tensors of mixed shapes, as a rank-2 LoRA adapter of a deep model has."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(2, 96), (96, 2), (2, 96), (32, 2)]
    return {f"layers.{i}.{'ABCD'[i % 4]}": torch.randn(shapes[i % 4], generator=generator) for i in range(tensors)}


def test_int8_flat_carries_the_same_numbers_as_int8_in_two_arrays():
    sent, new = _adapter_like_state(0), _adapter_like_state(1)
    flat, plain = Codec("int8-flat"), Codec("int8")
    encoded = flat.encode(new, sent, 1)
    assert sorted(encoded) == ["@int8", "@scales"]
    assert encoded["@int8"].dtype == torch.int8 and encoded["@int8"].numel() == sum(t.numel() for t in sent.values())
    assert encoded["@scales"].shape == (len(sent),)
    # the values of the first tensor in name order come first, quantized by its own absmax
    first = sorted(sent)[0]
    update = new[first] - sent[first]
    scale = update.abs().max() / 127
    torch.testing.assert_close(encoded["@scales"][0], scale)
    assert torch.equal(encoded["@int8"][:update.numel()], torch.round(update / scale).flatten().to(torch.int8))
    decoded, reference = flat.decode(encoded, sent), plain.decode(plain.encode(new, sent, 1), sent)
    assert list(decoded) == list(sent)
    for name in sent:
        assert torch.equal(decoded[name], reference[name])


def test_int8_flat_pays_the_framing_once():
    sent, new = _adapter_like_state(0, tensors=60), _adapter_like_state(1, tensors=60)
    payload = sum(t.numel() for t in sent.values()) + 4 * len(sent)  # one byte a value, fp32 scales
    flat = wire_bytes(ArrayRecord(Codec("int8-flat").encode(new, sent, 1)))
    plain = wire_bytes(ArrayRecord(Codec("int8").encode(new, sent, 1)))
    assert payload <= flat <= payload + 2_000
    assert plain - flat >= 2 * len(sent) * 100  # Flower frames every array (~510 bytes each in 1.41)


@pytest.mark.parametrize("codec, scales, values, says", [
    ("int8-flat", "@scales", 9, "holds 9 values and 2 scales; the 2 tensors sent hold 10 values in 2 tensors"),
    ("int8-rows", "@row-scales", 68, "holds 68 values and 2 scales; the 2 tensors sent hold 68 values in 3 rows")])
def test_broken_packed_updates_say_what_they_hold(codec, scales, values, says):
    sent = {"a": torch.zeros(2, 3 if codec == "int8-flat" else 32), "b": torch.zeros(4)}
    with pytest.raises(ValueError, match=says):
        Codec(codec).decode({"@int8": torch.zeros(values, dtype=torch.int8), scales: torch.ones(2)}, sent)
    with pytest.raises(ValueError, match=f"an {codec} update is the arrays"):  # the other form's parts
        Codec(codec).decode({"@int8": torch.zeros(values, dtype=torch.int8), "@other-scales": torch.ones(2)}, sent)


def test_int8_rows_scales_each_row_by_its_own_absmax():
    filler = torch.zeros(2, 29)  # rows of 32 values: b is scaled row by row
    sent = {"b": torch.zeros(2, 32), "a": torch.zeros(2)}
    new = {"b": torch.cat([torch.tensor([[1.0, -2.0, 0.5], [0.01, 0.03, -0.04]]), filler], 1),
           "a": torch.tensor([0.25, -1.0])}
    encoded = Codec("int8-rows").encode(new, sent, 1)
    assert sorted(encoded) == ["@int8", "@row-scales"]
    # a (a vector: one row) absmax 1 -> round(x * 127); b's rows: absmax 2 and 0.04
    values = encoded["@int8"].tolist()
    assert values[:2] == [32, -127] and values[2:5] == [64, -127, 32] and values[34:37] == [32, 95, -127]
    assert encoded["@int8"].numel() == 66 and not any(values[5:34] + values[37:])  # 31.75, 63.5 (half to even), 95.25
    torch.testing.assert_close(encoded["@row-scales"], torch.tensor([1 / 127, 2 / 127, 0.04 / 127]))
    decoded = Codec("int8-rows").decode(encoded, sent)
    # the small row keeps its digits; with one scale per tensor (2/127) it is [1, 2, -3] steps, off by up to 57%
    torch.testing.assert_close(decoded["b"][1, :3], torch.tensor([32.0, 95.0, -127.0]) * 0.04 / 127)
    assert (decoded["b"][1] - new["b"][1]).abs().max() <= 0.04 / 254 + 1e-8
    per_tensor = Codec("int8-flat").decode(Codec("int8-flat").encode(new, sent, 1), sent)["b"][1, :3]
    torch.testing.assert_close(per_tensor, torch.tensor([1.0, 2.0, -3.0]) * 2 / 127)


def test_int8_rows_of_higher_dims_and_scalars_round_trip_within_half_a_step():
    generator = torch.Generator().manual_seed(5)
    state = {"conv": torch.randn(3, 4, 8, generator=generator) * torch.tensor([1.0, 1e-3, 10.0])[:, None, None],
             "scalar": torch.tensor(0.7), "head": torch.randn(5, 40, generator=generator),
             "lora_B": torch.randn(64, 2, generator=generator)}  # rows of 2 values: one scale for the tensor
    sent = {name: torch.zeros_like(tensor) for name, tensor in state.items()}
    codec = Codec("int8-rows")
    encoded = codec.encode(state, sent, 1)
    assert encoded["@row-scales"].numel() == 3 + 5 + 1 + 1  # conv's 3 rows (dims past the first flattened), head's 5
    decoded = codec.decode(encoded, sent)
    for name, tensor in state.items():
        rows = tensor.reshape(tensor.shape[0], -1) if name in ("conv", "head") else tensor.reshape(1, -1)
        bound = rows.abs().amax(1, keepdim=True) / 254 + 1e-9
        assert decoded[name].shape == tensor.shape
        assert ((decoded[name] - tensor).reshape(rows.shape).abs() <= bound).all(), name


@pytest.mark.slow
def test_a_run_with_int8_flat_trains_as_int8_does_and_sends_fewer_bytes(tiny_bert, glue_dir, tmp_path):
    base = Settings(task="sst2", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=2, train_limit=40,
                    eval_limit=16, batch_size=8, max_length=32, local_steps=1, lora_r=2, engine="local",
                    algorithm="fedlora", out_dir=str(tmp_path))
    plain, flat = (read_jsonl(run_federated(base.replace(codec=codec), quiet=True) / "rounds.jsonl")
                   for codec in ("int8", "int8-flat"))
    for a, b in zip(plain, flat):
        assert (a["dev_loss"], a["dev_accuracy"]) == (b["dev_loss"], b["dev_accuracy"])  # the same numbers decoded
        assert a["bytes_down"] == pytest.approx(b["bytes_down"], rel=1e-3)  # fp32 both ways; Flower's metadata varies by bytes
    assert 0 < flat[-1]["bytes_up"] < plain[-1]["bytes_up"]


# --- codec-down: the state the server broadcasts


@pytest.mark.parametrize("codec, tolerance", [("fp16", 1e-3), ("int8", 1 / 254), ("int8-flat", 1 / 254),
                                                    ("int8-rows", 1 / 254)])
def test_a_broadcast_decodes_within_its_rounding(codec, tolerance):
    state = _adapter_like_state(3) | {"steps": torch.tensor([7, 9])}  # an integer tensor travels as it is
    arrays, layout = encode_broadcast(state, codec)
    decoded = decode_broadcast(arrays, layout)
    assert sorted(decoded) == sorted(state) and torch.equal(decoded["steps"], state["steps"])
    for name, tensor in state.items():
        if tensor.is_floating_point():  # int8: half a step of absmax / 127; fp16: its relative rounding
            bound = tensor.abs().max() * tolerance if codec != "fp16" else tensor.abs() * tolerance + 1e-7
            assert ((decoded[name] - tensor).abs() <= bound + 1e-7).all(), name
            assert decoded[name].shape == tensor.shape


def test_an_int8_flat_broadcast_is_int8_packed_with_its_layout():
    state = {"b": torch.tensor([[1.0, -2.0, 0.5]]), "a": torch.tensor([0.25, -1.0])}
    arrays, layout = encode_broadcast(state, "int8-flat")
    assert layout == {"names": ["a", "b"], "shapes": [1, 2, 2, 1, 3]}  # per tensor: ndim, then its dims
    # a's absmax 1.0 -> scale 1/127, values round(x * 127); b's 2.0 -> scale 2/127
    assert arrays["@int8"].tolist() == [32, -127, 64, -127, 32]  # round(31.75)=32, round(63.5)=64 (half to even)
    torch.testing.assert_close(arrays["@scales"], torch.tensor([1 / 127, 2 / 127]))
    assert encode_broadcast(state, "none") == (state, None)


def test_an_int8_flat_broadcast_pays_the_framing_once():
    state = _adapter_like_state(4, tensors=60)
    payload = sum(t.numel() for t in state.values()) + 4 * len(state)
    arrays, layout = encode_broadcast(state, "int8-flat")
    message = RecordDict({"arrays": ArrayRecord(arrays), LAYOUT: ConfigRecord(layout)})
    names = sum(len(name) for name in state)
    assert payload <= wire_bytes(message) <= payload + names + 8 * len(layout["shapes"]) + 3_000


def test_a_broken_broadcast_layout_says_so():
    arrays, layout = encode_broadcast({"a": torch.ones(2, 3)}, "int8-flat")
    with pytest.raises(ValueError, match="ends before the shape of 'a'"):
        decode_broadcast(arrays, {"names": ["a"], "shapes": [2, 2]})
    with pytest.raises(ValueError, match="holds 6 values and 1 scales; the 1 tensors sent hold 8"):
        decode_broadcast(arrays, {"names": ["a"], "shapes": [2, 2, 4]})
    with pytest.raises(ValueError, match="unknown codec-down 'svd'"):
        encode_broadcast({"a": torch.ones(2)}, "svd")


def test_rebase_moves_a_clients_change_onto_the_exact_state():
    exact = {"w": torch.tensor([0.30, -0.70, 0.01])}
    broadcast = Broadcast(exact, "int8")
    scale = 0.70 / 127
    torch.testing.assert_close(broadcast.received["w"], torch.round(exact["w"] / scale) * scale)
    trained = {"w": broadcast.received["w"] + torch.tensor([0.1, 0.2, -0.3])}
    torch.testing.assert_close(broadcast.rebase(trained)["w"], torch.tensor([0.40, -0.50, -0.29]))
    assert Broadcast(exact, "none").rebase(trained) is trained


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("uplink, downlink", [("none", "int8-flat"), ("int8-flat", "int8-flat"),
                                              ("int8-rows", "int8-rows")])
def test_the_strategy_sends_int8_and_keeps_the_rounding_out_of_the_global_model(uplink, downlink):
    settings = Settings(codec_down=downlink, codec=uplink)
    strategy = FedTuneStrategy(get_algorithm("fedlora", settings), {0: 100, 1: 101}, 1.0, 0, lambda r: 0.1,
                               Codec(uplink))
    exact = {"w": torch.tensor([0.30, -0.70, 0.01]), "v": torch.tensor([[2.0, 1.0]])}
    messages = list(strategy.configure_train(1, ArrayRecord(exact), ConfigRecord(), None))
    content = messages[0].content
    parts = ["@int8", "@scales"] if downlink == "int8-flat" else ["@int8", "@row-scales"]
    assert sorted(content["arrays"]) == parts and content[LAYOUT]["names"] == ["v", "w"]
    received = decode_broadcast(content["arrays"].to_torch_state_dict(), dict(content[LAYOUT]))
    assert not torch.equal(received["w"], exact["w"])  # the client trains from the rounded copy

    def reply(partition_id, change):
        TaskIdentity.node_id = 100 + partition_id
        new = {k: received[k] + change[k] for k in received}
        metrics = MetricRecord({"num-examples": 1, "partition-id": partition_id, "train-loss": 0.1,
                                "examples-seen": 1})
        arrays = Codec(uplink).encode(new, received, 1)
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), dst_node_id=0,
                       message_type="train")

    changes = [{"w": torch.tensor([0.1, 0.0, 0.0]), "v": torch.tensor([[0.0, 0.5]])},
               {"w": torch.tensor([0.3, 0.0, 0.0]), "v": torch.tensor([[0.0, 0.5]])}]
    arrays, _ = strategy.aggregate_train(1, [reply(0, changes[0]), reply(1, changes[1])])
    aggregated = arrays.to_torch_state_dict()  # the exact state plus the mean change, not the rounded state's
    tolerance = 0.5 / 127 / 2 if uplink != "none" else 1e-6  # int8-flat uplink rounds the change itself
    torch.testing.assert_close(aggregated["w"], torch.tensor([0.50, -0.70, 0.01]), atol=tolerance, rtol=0)
    torch.testing.assert_close(aggregated["v"], torch.tensor([[2.0, 1.5]]), atol=tolerance, rtol=0)


def test_codec_down_is_refused_with_dp_and_secagg():
    with pytest.raises(ValueError, match="codec-down needs dp-noise=0"):
        Settings(codec_down="int8", dp_noise=1.0)
    with pytest.raises(ValueError, match="codec-down needs dp-noise=0"):
        Settings(codec_down="fp16", secure_aggregation="secagg+", secagg_clip=8.0)


@pytest.mark.slow
@pytest.mark.parametrize("packed", ["int8-flat", "int8-rows"])
def test_a_run_with_an_int8_broadcast_sends_a_byte_a_value_and_trains_as_fp32(tiny_bert, glue_dir, tmp_path, packed):
    base = Settings(task="sst2", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=2, train_limit=40,
                    eval_limit=16, batch_size=8, max_length=32, local_steps=1, lora_r=2, engine="local",
                    algorithm="fedlora", codec=packed, out_dir=str(tmp_path))
    exact, rounded = (read_jsonl(run_federated(base.replace(codec_down=codec), quiet=True) / "rounds.jsonl")
                      for codec in ("none", packed))
    values = exact[-1]["travelling_parameters"]
    for a, b in zip(exact[1:], rounded[1:]):  # two train messages a round: 4 bytes a value against 1 (+ framing)
        assert a["bytes_down"] >= 2 * 4 * values and b["bytes_down"] <= 2 * (values + 4_000)
        assert b["bytes_up"] == pytest.approx(a["bytes_up"], rel=1e-2)
        assert b["dev_loss"] == pytest.approx(a["dev_loss"], abs=1e-2)  # trained from a copy rounded by < 0.4%
