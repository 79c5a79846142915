"""A real deployment on 127.0.0.1: SuperLink + 2 SuperNodes over TLS with SuperNode auth, `flwr run`."""

import json
from fedtune.deployment import LocalFederation, _bin, make_certificates
from fedtune.runs import read_jsonl


def test_fedlora_over_tls_with_node_auth(tiny_bert, glue_dir, tmp_path):
    out = tmp_path / "runs"
    run_config = (f"clients=2 rounds=2 task='cola' model='{tiny_bert}' glue-dir='{glue_dir}' out-dir='{out}' "
                  f"train-limit=40 eval-limit=32 batch-size=8 max-length=32 local-steps=2 lora-r=2 round-timeout=300.0")
    federation = LocalFederation(tmp_path / "deployment", nodes=2, port=9340)
    with federation:
        # A SuperNode whose key was never registered must not get in.
        intruder_keys = make_certificates(tmp_path / "intruder", nodes=1)
        intruder = federation._start("intruder", [
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
