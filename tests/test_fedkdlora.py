"""FedKDLoRA with the teacher on the clients: it persists on the client's disk and never travels."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedtune.client_app import make_client_app
from fedtune.client_state import load_kept, save_kept, state_folder
from fedtune.config import Settings
from fedtune.algorithms import get_algorithm
from fedtune.algorithms.fedkdlora import _distillation
from fedtune.local import cached_model, client_update, initial_state
from fedtune.teacher import pretrain_teacher, require_teacher

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def settings(tiny_bert, glue_dir, tmp_path_factory):
    settings = Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, algorithm="fedkdlora",
                        kd_placement="client", clients=2, rounds=2, train_limit=40, eval_limit=32, batch_size=8,
                        max_length=32, local_steps=2, lora_r=2, teacher_epochs=0.02, full_lr=1e-3, lora_lr=1e-2,
                        out_dir=str(tmp_path_factory.mktemp("kd")))
    pretrain_teacher(settings, quiet=True)
    return settings


def train_message(state, server_round):
    config = ConfigRecord({"server-round": server_round, "lr": 1e-2, "run-name": "test-run"})
    return Message(RecordDict({"arrays": ArrayRecord(state), "config": config}), dst_node_id=7, message_type="train")


def test_missing_teacher_is_a_clear_error(settings, tmp_path):
    with pytest.raises(FileNotFoundError, match="fedtune teacher"):
        require_teacher(settings.replace(out_dir=str(tmp_path)))


def test_client_teacher_persists_across_rounds_and_never_travels(settings):
    app = make_client_app(settings)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    algorithm = get_algorithm("fedkdlora", settings)
    start = initial_state(algorithm)
    _, initial_teacher = _distillation(settings, cached_model(algorithm, algorithm.client_settings(0)))

    folder = state_folder(settings.out_dir, "test-run")
    reply1 = app(train_message(start, 1), context)
    teacher1 = load_kept(folder, 0, server_round=2)
    assert set(teacher1) == set(initial_teacher) and all(k.startswith("teacher.") for k in teacher1)
    assert any(not torch.equal(teacher1[k], initial_teacher[k]) for k in teacher1)  # the teacher trained
    student1 = reply1.content["arrays"].to_torch_state_dict()
    assert set(student1) == set(start)  # the reply holds the student's trainable state and nothing else
    assert "teacher-dev-accuracy" in reply1.content["metrics"]

    reply2 = app(train_message(student1, 2), context)
    teacher2 = load_kept(folder, 0, server_round=3)
    assert sorted(p.name for p in folder.iterdir()) == ["client-0-round-1.safetensors",
                                                        "client-0-round-2.safetensors"]
    # Round 2 started from the teacher kept in round 1, not from a fresh one:
    from_kept = client_update(algorithm, 0, 2, student1, 2, 1e-2, kept_state=teacher1)
    from_fresh = client_update(algorithm, 0, 2, student1, 2, 1e-2, kept_state=None)
    for name, tensor in reply2.content["arrays"].to_torch_state_dict().items():
        torch.testing.assert_close(tensor, from_kept.state[name])
    assert any(not torch.equal(teacher2[k], from_fresh.kept_state[k]) for k in teacher2)
    # No teacher tensor appears in any reply, under any name.
    for reply in (reply1, reply2):
        sent = list(reply.content["arrays"].to_torch_state_dict().values())
        for kept in (teacher1, teacher2):
            assert not any(a.shape == b.shape and torch.equal(a, b) for a in sent for b in kept.values()
                           if b.abs().sum() > 0)


def test_client_state_keeps_the_two_newest_rounds(tmp_path):
    for r in range(1, 5):
        save_kept(tmp_path, 3, r, {"t": torch.full((2,), float(r))})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client-3-round-3.safetensors", "client-3-round-4.safetensors"]
    assert load_kept(tmp_path, 3, server_round=4)["t"][0] == 3.0  # a resumed round 4 starts from round 3's
    assert load_kept(tmp_path, 3, server_round=9)["t"][0] == 4.0
    assert load_kept(tmp_path, 1, server_round=9) is None
    with pytest.raises(ValueError, match="run name"):
        state_folder(str(tmp_path), "../escape")


def test_a_frozen_client_teacher_keeps_nothing_and_reports_its_pretrained_metrics(settings):
    from fedtune.teacher import teacher_metrics

    frozen = settings.replace(kd_mode="frozen-teacher", out_dir=settings.out_dir)
    app = make_client_app(frozen)
    context = Context(run_id=1, node_id=8, node_config={"partition-id": 1, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    algorithm = get_algorithm("fedkdlora", frozen)
    start = initial_state(algorithm)
    message = Message(RecordDict({"arrays": ArrayRecord(start), "config": ConfigRecord(
        {"server-round": 1, "lr": 1e-2, "run-name": "frozen-run"})}), dst_node_id=8, message_type="train")
    reply = app(message, context)
    metrics = reply.content["metrics"]
    expected = teacher_metrics(require_teacher(frozen))
    assert metrics["teacher-dev-accuracy"] == expected["accuracy"] and metrics["teacher-dev-mcc"] == expected["mcc"]
    assert load_kept(state_folder(frozen.out_dir, "frozen-run"), 1, server_round=2) is None
    student = reply.content["arrays"].to_torch_state_dict()
    assert any(not torch.equal(student[k], start[k]) for k in start)  # the student learned
    # the reply is the update computed from the pre-trained teacher alone (no kept state)
    again = client_update(algorithm, 1, 2, start, 1, 1e-2, kept_state=None)
    for name, tensor in student.items():
        torch.testing.assert_close(tensor, again.state[name])


def test_client_teachers_train_with_the_clients_own_label_skew_loss(settings, monkeypatch):
    """With `client-loss logit-adjust`, both models' task terms on a client are the loss adjusted
    by that client's own label counts (checked on hand-made logits against the formula)."""
    import fedtune.distill
    from fedtune.client_losses.logit_adjustment import logit_adjusted_loss
    from fedtune.data import cached_task_data
    from fedtune.partition import client_partitions

    settings = settings.replace(client_loss="logit-adjust", la_tau=2.0)
    seen = []
    real = fedtune.distill.distillation_losses
    monkeypatch.setattr(fedtune.distill, "distillation_losses", lambda *a: seen.append(a[4]) or real(*a))
    algorithm = get_algorithm("fedkdlora", settings)
    client_update(algorithm, 1, 2, initial_state(algorithm), 1, 1e-2)
    rows = cached_task_data(settings).private.select(client_partitions(settings, 2)[1])
    counts = torch.bincount(torch.tensor(rows["label"]), minlength=2).float()
    logits, labels = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.4, 0.9]]), torch.tensor([0, 1, 1])
    assert len(seen) == settings.local_steps and seen[0] is not None
    assert seen[0](logits, labels).item() == pytest.approx(logit_adjusted_loss(logits, labels, counts, 2.0).item())
