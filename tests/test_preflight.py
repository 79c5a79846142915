"""Bad input fails before anything starts: no simulation engine, no run folder, one message."""

from pathlib import Path

import pytest

import flwr.simulation
from fedtune.cli import main
from fedtune.config import Settings
from fedtune.simulation import run_federated


@pytest.fixture
def base(tiny_bert, glue_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda *a, **k: pytest.fail("the simulation started"))
    return Settings(task="cola", glue_dir=str(glue_dir), model=tiny_bert, clients=2, rounds=1, train_limit=40,
                    out_dir=str(tmp_path / "runs"))


@pytest.mark.parametrize("changes, error, message", [
    ({"glue_dir": "/nonexistent/glue"}, RuntimeError, "GLUE file not found: /nonexistent/glue/CoLA/train.tsv"),
    ({"clients": 50}, ValueError, "40 train rows cannot give 50 clients"),
    ({"algorithm": "flexlora", "dp_noise": 1.0}, ValueError, "needs dp-noise=0"),
    ({"algorithm": "fedex-lora", "dropout": 0.3}, ValueError, "needs dropout=0"),
    ({"resume": "/nonexistent/fedlora-cola-1.incomplete"}, FileNotFoundError, "does not exist"),
    ({"model": "/"}, ValueError, "model folder / holds no Hugging Face model"),
    ({"lora_targets": "query,nosuch"}, ValueError, "lora-targets nosuch: no layer of model 'bert' has that name "
                                                   r"\(its layers: .*query"),
    ({"algorithm": "fedkdlora", "student": "/nonexistent/student"}, ValueError,
     "model '/nonexistent/student' is not a folder"),
    ({"glue_dir": "MALFORMED"}, RuntimeError, r"train.tsv:1: expected 4 tab-separated columns"),
])
def test_bad_input_fails_before_the_engine_starts_and_leaves_no_run_folder(base, changes, error, message, tmp_path):
    if changes.get("glue_dir") == "MALFORMED":
        (tmp_path / "glue" / "CoLA").mkdir(parents=True)
        for name in ("train.tsv", "dev.tsv"):
            (tmp_path / "glue" / "CoLA" / name).write_text("only one column\n")
        changes = {"glue_dir": str(tmp_path / "glue")}
    with pytest.raises(error, match=message):
        run_federated(base.replace(**changes), quiet=True)
    assert not (tmp_path / "runs").exists()  # no run folder, complete or not, and not even the out-dir


def test_resume_of_a_folder_without_checkpoint_is_refused(base, tmp_path):
    folder = tmp_path / "runs" / "fedlora-cola-1.incomplete"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no checkpoint.safetensors: the run stopped before round 0 finished"):
        run_federated(base.replace(resume=str(folder)), quiet=True)


@pytest.mark.parametrize("below, message", [("", "is a file, not a folder"),
                                            ("/runs", "cannot be created (.*a-file is a file)")])
def test_an_out_dir_that_is_a_file_is_named(base, tmp_path, capsys, below, message):
    (tmp_path / "a-file").write_text("x")
    target = Path(f"{tmp_path / 'a-file'}{below}")
    with pytest.raises(ValueError, match=f"--out-dir {target} {message}"):
        run_federated(base.replace(out_dir=str(target)), quiet=True)
    code = main(["run", "--task", "cola", "--glue-dir", base.glue_dir, "--model", base.model, "--out-dir", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and str(target) in err


@pytest.mark.parametrize("args, message", [
    (["run", "--task", "cola", "--glue-dir", "/nonexistent"], "GLUE file not found: /nonexistent/CoLA/train.tsv"),
    (["centralized", "--model", "/nonexistent/model"], "model '/nonexistent/model' is not a folder"),
    (["resume", "/nonexistent/fedlora-cola-1.incomplete"], "config.json not found"),
])
def test_missing_inputs_are_reported_before_torch_is_imported(args, message, tmp_path):
    """The first error comes from the standard library alone (the CLI imports torch, transformers
    and Flower only after these checks): a missing file is reported at once."""
    import subprocess
    import sys

    code = ("import sys; from fedtune.cli import main; code = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, *args, "--out-dir", str(tmp_path / "runs")] if args[0] != "resume"
                          else [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and done.stderr.count("\n") == 1


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(base, tmp_path, monkeypatch):
    """Past the checks, a run folder exists; an error before round 0 is checkpointed removes it (it
    holds nothing to resume), as Ctrl-C does. A run with a checkpoint keeps it (test_checkpoint)."""
    import fedtune.server_app

    def fail(*args, **kwargs):
        assert list((tmp_path / "runs").glob("*.incomplete")), "the run folder should exist by now"
        raise RuntimeError("the strategy could not be built")

    monkeypatch.setattr(fedtune.server_app, "build_runner", fail)
    with pytest.raises(RuntimeError, match="the strategy could not be built"):
        run_federated(base.replace(engine="local"), quiet=True)
    assert list((tmp_path / "runs").iterdir()) == []
