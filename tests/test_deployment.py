"""A real deployment on 127.0.0.1: SuperLink + 2 SuperNodes over TLS with SuperNode auth, `flwr run`."""

import json
import time

import pytest

from fedtune.deployment import LocalFederation, _bin, make_certificates
from fedtune.runs import read_jsonl

pytestmark = pytest.mark.slow  # the full tier (FULL=1 bash scripts/test.sh)


def test_fedlora_over_tls_with_node_auth(tiny_bert, glue_dir, tmp_path):
    out = tmp_path / "runs"
    run_config = (f"clients=2 rounds=2 task='cola' model='{tiny_bert}' glue-dir='{glue_dir}' out-dir='{out}' "
                  f"train-limit=40 eval-limit=32 batch-size=8 max-length=32 local-steps=2 lora-r=2 round-timeout=300.0")
    federation = LocalFederation(tmp_path / "deployment", nodes=2, port=9340)
    with federation:
        # A SuperNode whose key was never registered must not get in.
        intruder_keys = make_certificates(tmp_path / "intruder", nodes=1)
        federation._start("intruder", [
            _bin("flower-supernode"), "--superlink", "127.0.0.1:9340", "--root-certificates",
            str(federation.workdir / "certificates" / "ca.crt"), "--auth-supernode-private-key",
            str(intruder_keys / "node-0"), "--port", "9349", "--node-config", "partition-id=1 num-partitions=2"])
        result = federation.run(run_config, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    assert all(p.poll() is not None for p in federation.processes)  # everything it started is stopped
    [run] = [p for p in out.iterdir() if p.name.startswith("fedlora-cola-")]
    rounds = read_jsonl(run / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2] and all(r["accepted"] == 2 for r in rounds[1:])
    assert json.loads((run / "summary.json").read_text())["total_bytes_up"] > 0
    assert "https://127.0.0.1:9340" in (federation.workdir / "superlink.log").read_text()
    assert "Failed to activate SuperNode" in (federation.workdir / "intruder.log").read_text()


def test_a_killed_supernode_rejoins_and_the_run_completes(tiny_bert, glue_dir, tmp_path):
    out = tmp_path / "runs"
    run_config = (f"clients=2 rounds=5 task='cola' model='{tiny_bert}' glue-dir='{glue_dir}' out-dir='{out}' "
                  f"train-limit=40 eval-limit=32 batch-size=8 max-length=32 local-steps=2 lora-r=2 round-timeout=300.0")
    with LocalFederation(tmp_path / "deployment", nodes=2, port=9350) as federation:
        run = federation.submit(run_config)
        deadline = time.monotonic() + 600
        while len(_rounds(out)) < 2:  # round 1 finished with both nodes
            assert run.poll() is None and time.monotonic() < deadline, federation._log("flwr-run")[-3000:]
            time.sleep(0.5)
        starts = federation.restart_supernode(1)
        assert run.wait(timeout=600) == 0, federation._log("flwr-run")[-3000:]
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4, 5]
    assert rounds[1]["accepted"] == 2 and all(r["accepted"] >= 1 for r in rounds[2:])
    # The same node (same key, same node id) came back and trained again. If the old process had
    # already taken round 2's message, that round goes on without it ("Node Unavailable" once its
    # heartbeats stop); if not, the restarted node picks the message up itself.
    restarted = federation._log(f"supernode-1-restart-{starts}")
    node_id = federation._log("supernode-1").split("SuperNode ID: ")[1].split()[0]
    assert f"SuperNode ID: {node_id}" in restarted and "Receiving: train message" in restarted
    assert rounds[-1]["accepted"] == 2, [(r["round"], r["accepted"], r["dropped"]) for r in rounds]
    for r in rounds[2:]:
        assert all("Node Unavailable" in d["reason"] for d in r["dropped"]), r["dropped"]


def _rounds(out):
    files = list(out.glob("*/rounds.jsonl"))
    return read_jsonl(files[0]) if files else []


def test_deployment_writes_run_folders_under_its_workdir(tmp_path):
    from fedtune.deployment import deployment_run_config

    assert deployment_run_config(2, "rounds=2", tmp_path) == f'clients=2 rounds=2 out-dir="{tmp_path}/runs"'
    assert deployment_run_config(3, 'out-dir="/elsewhere"', tmp_path) == 'clients=3 out-dir="/elsewhere"'


def test_a_stopped_deployment_run_is_told_how_to_resume(tmp_path):
    from fedtune.deployment import resume_hint

    runs = tmp_path / "runs"
    assert resume_hint(runs, "rounds=5") is None
    (runs / "fedlora-cola-1.incomplete").mkdir(parents=True)  # stopped before round 0: nothing to resume
    assert resume_hint(runs, "rounds=5") is None
    (runs / "fedlora-cola-1.incomplete" / "checkpoint.safetensors").write_bytes(b"x")
    hint = resume_hint(runs, "rounds=5")
    assert f"--run-config 'rounds=5 resume=\"{runs / 'fedlora-cola-1.incomplete'}\"'" in hint
