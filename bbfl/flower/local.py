"""A real Flower deployment on this machine: one SuperLink, N SuperNodes, `flwr run`, status polling.

For trying the Flower path without a cluster (``bbfl flower-local``) and for the tests. These are the
same processes a multi-machine deployment runs (see README, "Scale-out on Flower"); only the
addresses differ. ``--insecure`` is used because everything stays on 127.0.0.1. Runtime dependency
installation is off (Flower 1.41 runs ``uv sync`` for every run otherwise, which needs a package index):
the apps run in the environment bbfl is installed in.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bbfl.exceptions import BBFLError, ConfigError
from bbfl.processes import descendants, free_port, kill_pids, signal_group


class LocalFederation:
    """Start a SuperLink and ``num_nodes`` SuperNodes (``partition-id`` 0..N-1); always ``stop()`` them.

    >>> # with LocalFederation(3) as fed: fed.run(config_json, "runs/flower-demo")
    """

    def __init__(self, num_nodes: int, workdir: str | Path | None = None, threads_per_node: int = 1) -> None:
        if num_nodes < 1:
            raise ConfigError(f"num_nodes must be >= 1, got {num_nodes}")
        for tool in ("flower-superlink", "flower-supernode", "flwr"):
            if shutil.which(tool) is None:
                raise ConfigError(f"`{tool}` not found: install the Flower extra, pip install -e '.[flower]'")
        self.num_nodes = num_nodes
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="bbfl-flower-"))
        self.port = free_port()
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.workdir / "flwr-home"),
            "OMP_NUM_THREADS": str(threads_per_node),
            # no `uv sync` per run (it needs the network), no update check: loopback only
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> LocalFederation:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, wait: float = 60.0) -> None:
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        # the CLI's SuperLink connection (Flower >= 1.26 keeps them in $FLWR_HOME/config.toml)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "bbfl"\n\n[superlink.bbfl]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        # a file database: the in-memory one fails under concurrent pushes (sqlite "statements in progress")
        link = ["flower-superlink", "--insecure", "--port", str(self.port), "--database", str(self.workdir / "link.db")]
        self._spawn("superlink", [*link, "--disable-runtime-dependency-installation"])
        self._wait_for_port(self.port, wait)
        for i in range(self.num_nodes):
            args = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}"]
            args += ["--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={self.num_nodes}"]
            self._spawn(f"supernode{i}", args)

    def run(self, config_json: str, run_dir: str | Path, timeout: float = 900.0) -> dict:
        """Submit a bbfl run with `flwr run`, poll its status until it ends; returns the final status."""
        from bbfl.flower.app import APP_DIR

        overrides = self.workdir / "run-config.toml"
        overrides.write_text(f"bbfl-config = {json.dumps(config_json)}\nrun-dir = {json.dumps(str(run_dir))}\n")
        submit = subprocess.run(
            ["flwr", "run", str(APP_DIR), "bbfl", "--run-config", str(overrides), "--format", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        try:
            run_id = json.loads(submit.stdout)["run-id"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise BBFLError(f"`flwr run` did not start a run: {submit.stdout[-500:]} {submit.stderr[-500:]}") from exc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # the exit code of `flwr run --stream` is not the run's outcome
            status = self.status(run_id)
            if status.get("status", "") == "finished:completed":
                return status
            if status.get("status", "").startswith("finished"):
                raise BBFLError(self._failure(run_id, status))
            time.sleep(2)
        raise BBFLError(f"Flower run {run_id} did not finish within {timeout:.0f}s; logs in {self.workdir}")

    def _failure(self, run_id: int | str, status: dict) -> str:
        """Why a run ended without completing: its status details and the SuperLink's last error lines."""
        log = self.workdir / "superlink.log"
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        errors = [line.strip() for line in lines if "ERROR" in line or "exception" in line.lower()][-3:]
        why = " | ".join(errors) or "no error in the SuperLink log"
        details = status.get("status-details") or ""
        return f"Flower run {run_id} ended {status.get('status')} {details}: {why} (logs in {self.workdir})"

    def status(self, run_id: int | str) -> dict:
        out = subprocess.run(
            ["flwr", "ls", "bbfl", "--run-id", str(run_id), "--format", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        try:
            runs = json.loads(out.stdout).get("runs", [])
        except json.JSONDecodeError:
            return {}
        return runs[0] if runs else {}

    def stop(self) -> None:
        """Stop every process started, with the helpers they spawned (flower-superexec, app processes)."""
        # the SuperLink starts its superexec in a session of its own, out of reach of killpg: note them all first
        spawned = [pid for proc in self.processes for pid in descendants(proc.pid)]
        for proc in reversed(self.processes):
            signal_group(proc, signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGKILL)
                proc.wait()
            signal_group(proc, signal.SIGKILL)  # children that outlive their parent (superexec) go too
        kill_pids(spawned)
        self.processes = []

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 - the process writes it until stopped
        # own session: stop() signals the whole group, so Flower's own child processes cannot leak
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)

    def _wait_for_port(self, port: int, wait: float) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.processes[0].poll() is not None:
                raise BBFLError(f"flower-superlink exited; see {self.workdir / 'superlink.log'}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise BBFLError(f"flower-superlink did not listen on {port} within {wait:.0f}s")
