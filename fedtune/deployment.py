"""A real Flower deployment on this machine: a SuperLink and N SuperNodes over TLS with node auth.

`make_certificates` writes a development CA, a SuperLink certificate for 127.0.0.1/localhost
and one EC key pair per SuperNode (the SuperLink only accepts registered nodes).
`LocalFederation` starts the processes, registers the nodes, submits the app with `flwr run`
and stops every process it started when it exits, also after an error.

    python -m fedtune.deployment --nodes 2 --run-config "clients=2 rounds=2 train-limit=200"

Not for production: the keys are unencrypted files in one folder.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[1]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key, path: Path, ssh: bool = False) -> None:
    encoding = serialization.Encoding.PEM
    fmt = serialization.PrivateFormat.OpenSSH if ssh else serialization.PrivateFormat.PKCS8
    path.write_bytes(key.private_bytes(encoding, fmt, serialization.NoEncryption()))
    path.chmod(0o600)


def make_certificates(folder: Path, nodes: int) -> Path:
    """CA, SuperLink certificate (127.0.0.1, localhost) and `nodes` SuperNode key pairs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + datetime.timedelta(days=30))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder(subject_name=_name("fedtune dev CA"), issuer_name=_name("fedtune dev CA"),
                                  public_key=ca_key.public_key(), serial_number=x509.random_serial_number(), **valid)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = (x509.CertificateBuilder(subject_name=_name("127.0.0.1"), issuer_name=ca.subject,
                                      public_key=server_key.public_key(), serial_number=x509.random_serial_number(),
                                      **valid)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .sign(ca_key, hashes.SHA256()))
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, folder / "server.key")
    for node in range(nodes):  # SuperNode authentication keys, OpenSSH format as Flower expects
        key = ec.generate_private_key(ec.SECP384R1())
        _write_key(key, folder / f"node-{node}", ssh=True)
        (folder / f"node-{node}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return folder


class LocalFederation:
    """SuperLink + SuperNodes on 127.0.0.1 with TLS and SuperNode auth; a context manager.

    Parameters
    ----------
    workdir : Path
        Certificates, logs and `FLWR_HOME` go here.
    nodes : int
        SuperNodes to start; node i gets `partition-id=i num-partitions=nodes`.
    port : int
        The SuperLink's port (Flower 1.41 serves Fleet, Control and runtime APIs on one port);
        node i's own API uses port + 1 + i.
    """

    def __init__(self, workdir: Path, nodes: int = 2, port: int = 9300):
        self.workdir, self.nodes, self.port = Path(workdir), nodes, port
        self.home = self.workdir / "flwr-home"
        self.processes: list[subprocess.Popen] = []
        self.supernodes: dict[int, subprocess.Popen] = {}
        # Flower starts helpers (flower-superexec, flwr-serverapp, ...) by name: this environment's first.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "PATH": path, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0"}

    def _start(self, name: str, args: list[str], cwd: Path | None = None) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "wb") as log:  # the child keeps its own handle
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                       start_new_session=True, cwd=cwd)
        self.processes.append(process)
        return process

    def _flwr(self, *args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=cwd)

    def __enter__(self) -> LocalFederation:
        try:
            self._up()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _up(self) -> None:
        certs = make_certificates(self.workdir / "certificates", self.nodes)
        self.home.mkdir(parents=True, exist_ok=True)
        address = f"127.0.0.1:{self.port}"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local-tls"\n\n[superlink.local-tls]\naddress = "{address}"\n'
            f'root-certificates = "{certs / "ca.crt"}"\n')
        self._start("superlink", [_bin("flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
                                  "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
                                  "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                                  "--host", "127.0.0.1", "--port", str(self.port),
                                  "--database", str(self.workdir / "superlink.db")])
        self._wait_for("superlink", "Starting Flower SuperExec", 60)
        for node in range(self.nodes):
            registered = self._flwr("supernode", "register", str(certs / f"node-{node}.pub"))
            if registered.returncode != 0:
                raise RuntimeError(f"registering node {node} failed: {registered.stdout}{registered.stderr}")
            self.supernodes[node] = self._start_supernode(node)

    def _start_supernode(self, node: int, log_name: str = "") -> subprocess.Popen:
        certs = self.workdir / "certificates"
        return self._start(log_name or f"supernode-{node}", [
            _bin("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--root-certificates",
            str(certs / "ca.crt"), "--auth-supernode-private-key", str(certs / f"node-{node}"),
            "--port", str(self.port + 1 + node), "--node-config", f"partition-id={node} num-partitions={self.nodes}"])

    def restart_supernode(self, node: int, timeout: float = 180) -> int:
        """Kill SuperNode `node` (and its ClientApps) and start it again with the same key.

        The SuperLink refuses the key until it has marked the old session offline (after two
        missed 30-s heartbeats), so a refused start is retried, as a service manager would.
        Returns the number of starts it took.
        """
        old = self.supernodes[node]
        os.killpg(old.pid, signal.SIGKILL)
        old.wait()
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            log_name = f"supernode-{node}-restart-{attempt}"
            process = self._start_supernode(node, log_name)
            while process.poll() is None and "SuperNode ID:" not in self._log(log_name):
                time.sleep(0.5)
            if process.poll() is None:
                self.supernodes[node] = process
                return attempt
            if time.monotonic() > deadline:
                raise TimeoutError(f"SuperNode {node} was not let back in within {timeout:.0f} s; "
                                   f"see {self.workdir}/{log_name}.log")
            time.sleep(5)

    def _log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def _wait_for(self, log_name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self._log(log_name):
                return
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"a Flower process exited early; see {self.workdir}/*.log")
            time.sleep(0.5)
        raise TimeoutError(f"{log_name}.log did not say {text!r} within {timeout:.0f} s")

    def run(self, run_config: str, app: Path = REPO, timeout: float = 900) -> subprocess.CompletedProcess:
        """`flwr run APP --stream` against this federation; returns the finished process."""
        return self._flwr("run", str(app), "--stream", "--run-config", run_config, timeout=timeout, cwd=app)

    def submit(self, run_config: str, app: Path = REPO) -> subprocess.Popen:
        """`flwr run APP --stream` in the background (stopped with the federation); log in flwr-run.log."""
        return self._start("flwr-run", [_bin("flwr"), "run", str(app), "--stream", "--run-config", run_config], cwd=app)

    def stop(self) -> None:
        """Stop every process this federation started (their children too)."""
        for process in reversed(self.processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (not whatever PATH finds first)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def deployment_run_config(nodes: int, run_config: str, workdir: Path) -> str:
    """The run config `flwr run` gets: one client per node, run folders under the work folder."""
    run_config = f"clients={nodes} {run_config}".strip()
    return run_config if "out-dir=" in run_config else f'{run_config} out-dir="{workdir / "runs"}"'


def resume_hint(runs: Path, run_config: str) -> str | None:
    """What to run to continue a deployment run that stopped after a checkpointed round (the
    SuperLink died, a node failed for good): the same run config plus `resume=<its folder>`."""
    from fedtune.checkpoint import has_checkpoint

    stopped = [f for f in sorted(Path(runs).glob("*.incomplete")) if has_checkpoint(f)]
    if not stopped:
        return None
    return (f"the run stopped after a checkpointed round; continue it with: bash scripts/deploy-local.sh "
            f"--run-config '{run_config} resume=\"{stopped[-1]}\"' (flwr run: the same --run-config)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run fedtune on a local SuperLink + SuperNodes (TLS, node auth).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes to start, one client (partition) each")
    parser.add_argument("--workdir", type=Path, default=Path("runs/deployment"),
                        help="folder (relative to the current one) for certificates, logs, Flower's state and the "
                        "run folder (<workdir>/runs)")
    parser.add_argument("--port", type=int, default=9300, help="the SuperLink's port on 127.0.0.1 (also port+1)")
    parser.add_argument("--run-config", default="",
                        help="Flower run config, e.g. 'rounds=2 train-limit=400'; clients is set to --nodes and "
                        "out-dir to <workdir>/runs unless given")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    run_config = deployment_run_config(args.nodes, args.run_config, workdir)
    with LocalFederation(workdir, args.nodes, args.port) as federation:
        result = federation.run(run_config)
    print(result.stdout, result.stderr, sep="\n")
    print(f"certificates, logs and Flower's state: {workdir}; run folders: {workdir / 'runs'}")
    if result.returncode != 0 and (hint := resume_hint(workdir / "runs", args.run_config)):
        print(hint, file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
