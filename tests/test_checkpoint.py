"""Checkpoints are data: a crafted file never runs code, every bad file gets one clear error
naming it, and what was saved is what is restored."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from fedtune import checkpoint as checkpoints
from fedtune.checkpoint import CheckpointError


def _records(n=2):
    return [{"round": r, "elapsed": 1.5 * r, "cum_bytes_up": 10 * r, "cum_bytes_down": 20 * r, "accepted": 3}
            for r in range(n)]


def test_save_then_load_gives_back_tensors_records_and_settings(tmp_path):
    state = {"a.lora_A.weight": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.0, -2.0])}
    base = torch.arange(12.0)
    algorithm_state = {"m.w": base[:4], "v.w": base[4:8], "sent-until": torch.zeros(0, 2, dtype=torch.long)}
    checkpoints.save(tmp_path, state, algorithm_state, _records(), {"algorithm": "fedadam", "lora-r": 8})
    loaded = checkpoints.load(tmp_path)
    assert loaded.records == _records() and loaded.settings == {"algorithm": "fedadam", "lora-r": 8}
    assert loaded.global_state.keys() == state.keys() and all(torch.equal(loaded.global_state[k], v) for k, v in state.items())
    assert loaded.algorithm_state.keys() == algorithm_state.keys()
    assert all(torch.equal(loaded.algorithm_state[k], v) for k, v in algorithm_state.items())
    assert loaded.algorithm_state["sent-until"].dtype == torch.long
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]


def test_a_failed_write_names_the_folder_and_leaves_no_tmp(tmp_path, monkeypatch):
    def disk_full(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "save_file", disk_full)
    with pytest.raises(RuntimeError, match=f"could not write the checkpoint in {tmp_path} .*MB free"):
        checkpoints.save(tmp_path, {"w": torch.ones(2)}, {}, _records(), {})
    assert list(tmp_path.iterdir()) == []


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "PWNED"
    (tmp_path / "checkpoint.pt").write_bytes(pickle.dumps({"records": _RunsCode(marker)}))
    with pytest.raises(CheckpointError, match="checkpoint.pt is a pickle checkpoint from an older fedtune; it is not read"):
        checkpoints.load(tmp_path)
    # The same bytes under the new name: safetensors does not parse them either.
    os.replace(tmp_path / "checkpoint.pt", tmp_path / "checkpoint.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint.safetensors is not a fedtune checkpoint"):
        checkpoints.load(tmp_path)
    assert not marker.exists()


def _valid(tmp_path):
    checkpoints.save(tmp_path, {"w": torch.ones(3)}, {}, _records(), {"algorithm": "fedlora"})
    return tmp_path / "checkpoint.safetensors"


def _rewrite(path, metadata=None, tensors=None):
    from safetensors.torch import save_file

    save_file(tensors or {"global/w": torch.ones(3)}, str(path), metadata=metadata)


BAD = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "random bytes": lambda p: p.write_bytes(os.urandom(4096)),
    "header only": lambda p: p.write_bytes(p.read_bytes()[:8]),
    "no format": lambda p: _rewrite(p, {"records": json.dumps(_records()), "settings": "{}"}),
    "records not json": lambda p: _rewrite(p, {"format": checkpoints.FORMAT, "records": "[{", "settings": "{}"}),
    "records null": lambda p: _rewrite(p, {"format": checkpoints.FORMAT, "records": "null", "settings": "{}"}),
    "record with a string": lambda p: _rewrite(p, {"format": checkpoints.FORMAT, "settings": "{}",
                                                   "records": json.dumps([{**_records(1)[0], "elapsed": "x"}])}),
    "rounds out of order": lambda p: _rewrite(p, {"format": checkpoints.FORMAT, "settings": "{}",
                                                  "records": json.dumps(_records(3)[::2])}),
    "settings a list": lambda p: _rewrite(p, {"format": checkpoints.FORMAT, "settings": "[]",
                                              "records": json.dumps(_records())}),
    "no settings": lambda p: _rewrite(p, {"format": checkpoints.FORMAT, "records": json.dumps(_records())}),
    "no global state": lambda p: _rewrite(p, {"format": checkpoints.FORMAT, "settings": "{}",
                                              "records": json.dumps(_records())}, {"algorithm/m": torch.ones(1)}),
    "stray tensor": lambda p: _rewrite(p, {"format": checkpoints.FORMAT, "settings": "{}",
                                           "records": json.dumps(_records())},
                                       {"global/w": torch.ones(3), "other": torch.ones(1)}),
}


@pytest.mark.parametrize("damage", sorted(BAD))
def test_every_damaged_checkpoint_gets_one_error_naming_the_file(tmp_path, damage):
    path = _valid(tmp_path)
    BAD[damage](path)
    with pytest.raises(CheckpointError) as error:
        checkpoints.load(tmp_path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message and message.endswith("start the run anew")


def test_state_of_another_model_is_refused(tmp_path):
    expected = {"w": torch.zeros(3), "b": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="does not hold this run's model"):
        checkpoints.check_state({"w": torch.zeros(3)}, expected, tmp_path)
    with pytest.raises(CheckpointError, match=r"holds w as \(4,\) torch.float32, this run's model has \(3,\)"):
        checkpoints.check_state({"w": torch.zeros(4), "b": torch.zeros(2)}, expected, tmp_path)
    with pytest.raises(CheckpointError, match="NaN or Inf in b"):
        checkpoints.check_state({"w": torch.zeros(3), "b": torch.tensor([0.0, float("nan")])}, expected, tmp_path)
    checkpoints.check_state({"w": torch.ones(3), "b": torch.ones(2)}, expected, tmp_path)  # same keys and shapes


def test_a_resume_under_other_settings_is_refused_naming_them(tmp_path):
    path = _valid(tmp_path)
    loaded = checkpoints.load(tmp_path)
    with pytest.raises(CheckpointError, match=r"algorithm \(checkpoint 'fedlora', now 'flexlora'\)"):
        checkpoints.check_settings(loaded, {"algorithm": "flexlora"}, path)
    checkpoints.check_settings(loaded, {"algorithm": "fedlora", "resume": "anything"}, path)


def _interrupted_run(tmp_path, tiny_bert, glue_dir, monkeypatch):
    """A tiny fedlora run (local engine) killed right after round 1's checkpoint was written."""
    from fedtune.config import Settings
    from fedtune.simulation import run_federated

    settings = Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=2, train_limit=40,
                        eval_limit=16, batch_size=8, max_length=32, local_steps=1, lora_r=2, engine="local",
                        out_dir=str(tmp_path / "runs"))
    real_save = checkpoints.save

    def save_then_crash(folder, state, algorithm_state, records, *args):
        real_save(folder, state, algorithm_state, records, *args)
        if records[-1]["round"] == 1:
            raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(checkpoints, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_federated(settings, quiet=True)
    monkeypatch.setattr(checkpoints, "save", real_save)
    [folder] = (tmp_path / "runs").glob("fedlora-cola-*.incomplete")
    return folder


def _cli(*args, cwd):
    code = "import sys; from fedtune.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_fedtune_resume_runs_no_code_from_a_crafted_checkpoint_and_refuses_edits(tmp_path, tiny_bert, glue_dir,
                                                                                 monkeypatch):
    """The probe of the issue, through the command: a pickle dropped into an interrupted run's
    folder, or a checkpoint.safetensors that is really that pickle, runs nothing; an edited
    config.json is refused; each with exit 2 and one line naming the file."""
    folder = _interrupted_run(tmp_path, tiny_bert, glue_dir, monkeypatch)
    good = (folder / "checkpoint.safetensors").read_bytes()
    marker = tmp_path / "PWNED"
    crafted = pickle.dumps({"global": {}, "algorithm": {}, "records": _RunsCode(marker)})
    cases = {"checkpoint.pt": crafted, "checkpoint.safetensors": crafted}
    for name, data in cases.items():
        (folder / "checkpoint.safetensors").unlink(missing_ok=True)
        (folder / name).write_bytes(data)
        done = _cli("resume", str(folder), "--quiet", cwd=tmp_path)
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr and str(folder / name) in done.stderr
        (folder / name).unlink()
    assert not marker.exists()

    (folder / "checkpoint.safetensors").write_bytes(good)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "algorithm": "flexlora"}))
    done = _cli("resume", str(folder), "--quiet", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "other settings: algorithm (checkpoint 'fedlora', now 'flexlora')" in done.stderr
    assert [json.loads(line)["round"] for line in (folder / "rounds.jsonl").open()] == [0, 1]

    for damaged in (b"", b"not json"):
        (folder / "config.json").write_bytes(damaged)
        done = _cli("resume", str(folder), "--quiet", cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
        assert str(folder / "config.json") in done.stderr and "Traceback" not in done.stderr

    (folder / "config.json").write_text(json.dumps(config))
    done = _cli("resume", str(folder), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    finished = folder.with_name(folder.name.removesuffix(".incomplete"))
    assert [json.loads(line)["round"] for line in (finished / "rounds.jsonl").open()] == [0, 1, 2]


@pytest.mark.slow
def test_a_run_whose_rounds_all_fail_stops_with_an_error_and_is_kept(tmp_path, tiny_bert, glue_dir):
    """Nearly every client drops out (simulated faults): the rounds past max-failed-rounds stop the
    run with exit 2 and one line; the folder stays .incomplete, so `report` lists nothing."""
    out = tmp_path / "runs"
    done = _cli("run", "--task", "cola", "--glue-dir", str(glue_dir), "--model", tiny_bert, "--clients", "2",
                "--rounds", "4", "--train-limit", "40", "--eval-limit", "16", "--batch-size", "8", "--max-length",
                "32", "--local-steps", "1", "--lora-r", "2", "--engine", "local", "--dropout", "0.99",
                "--max-failed-rounds", "2", "--out-dir", str(out), "--quiet", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr  # a warning per dropped reply, then the error as the last line
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fedtune: error: ") and "3 of 3 rounds had no usable client reply (max-failed-rounds=2; round 3: client error" in last
    [folder] = out.glob("fedlora-cola-*")
    assert folder.name.endswith(".incomplete") and (folder / "checkpoint.safetensors").is_file()
    assert _cli("report", str(out), cwd=tmp_path).returncode == 2  # no finished run to list


def test_a_full_disk_at_the_end_keeps_the_run_resumable(tmp_path, tiny_bert, glue_dir, monkeypatch):
    """The tokenizers library raises a bare Exception when the disk fills: the run stops with one
    error naming the folder, stays .incomplete with its last checkpoint, and a resume only writes
    the results."""
    from transformers import PreTrainedTokenizerBase

    from fedtune.config import Settings
    from fedtune.runs import read_jsonl
    from fedtune.simulation import run_federated

    settings = Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=1, train_limit=40,
                        eval_limit=16, batch_size=8, max_length=32, local_steps=1, lora_r=2, engine="local",
                        out_dir=str(tmp_path / "runs"))

    def disk_full(*args, **kwargs):
        raise Exception("No space left on device (os error 28)")  # noqa: TRY002  (what tokenizers raises)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    with pytest.raises(RuntimeError, match=r"could not write the final model, plots and summary into .*"
                                           r"No space left on device.*`fedtune resume .*\.incomplete` writes them"):
        run_federated(settings, quiet=True)
    monkeypatch.undo()
    [folder] = (tmp_path / "runs").glob("fedlora-cola-*.incomplete")
    assert (folder / "checkpoint.safetensors").is_file() and not (folder / "summary.json").exists()
    finished = run_federated(settings.replace(resume=str(folder)), quiet=True)
    assert [r["round"] for r in read_jsonl(finished / "rounds.jsonl")] == [0, 1]
    assert (finished / "summary.json").is_file() and (finished / "model" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_a_run_is_not_continued_with_a_teacher_trained_since(tmp_path, tiny_bert, glue_dir, interrupt_after_round):
    """FedKDLoRA's round 0 records the teacher's dev metrics. If the cached teacher was trained
    again since (another precision once shared its folder), `resume` refuses, naming the file, and
    the grid leaves that interrupted cell alone and runs it anew with the teacher it has now."""
    import json

    from fedtune.checkpoint import TeacherChanged
    from fedtune.config import Settings
    from fedtune.grid import Cell, run_cell
    from fedtune.simulation import run_federated
    from fedtune.teacher import teacher_dir

    cells = tmp_path / "cells"
    settings = Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, algorithm="fedkdlora", clients=2,
                        rounds=2, train_limit=40, eval_limit=16, batch_size=8, max_length=32, local_steps=1, lora_r=2,
                        teacher_epochs=0.05, engine="local", out_dir=str(cells))
    interrupt_after_round(1)
    with pytest.raises(KeyboardInterrupt):
        run_federated(settings, quiet=True)
    [folder] = cells.glob("fedkdlora-cola-*.incomplete")
    card = teacher_dir(settings) / "teacher.json"
    teacher = json.loads(card.read_text())
    teacher["dev"]["loss"] += 0.25  # as if trained again
    card.write_text(json.dumps(teacher))

    with pytest.raises(TeacherChanged, match=f"{folder}/checkpoint.safetensors: this run started with another "
                                             r"teacher .* start the run anew"):
        run_federated(settings.replace(resume=str(folder)), quiet=True)
    result = run_cell(Cell("Fed-LoRA-KD (server teacher)", settings, False), cells, quiet=True)
    assert folder.is_dir() and result["run"] != str(folder)
    assert [r["round"] for r in result["rounds"]] == [0, 1, 2]
    assert result["rounds"][0]["teacher_dev_loss"] == teacher["dev"]["loss"]
