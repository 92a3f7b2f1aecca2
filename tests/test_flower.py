"""FedBPT and FedKSeed on Flower's Deployment Engine: a real SuperLink + 3 SuperNodes + `flwr run`, vs. in-process."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from bbfl.federation.engine import EngineConfig, run_federation  # noqa: E402
from bbfl.federation.flower_local import LocalFederation  # noqa: E402
from bbfl.io import load_arrays  # noqa: E402
from bbfl.methods.fedbpt import FedBPTConfig  # noqa: E402
from bbfl.methods.fedkseed import FedKSeedConfig  # noqa: E402
from bbfl.pipeline import BlackBoxConfig, FederatedDataConfig, build_federated_method  # noqa: E402


def _flower_processes(settle: float = 0.0) -> set[str]:
    """Live Flower processes (zombies excluded: where PID 1 does not reap orphans they linger harmlessly)."""
    deadline = time.monotonic() + settle
    while True:
        pattern = "flower-super|flwr-serverapp|flwr-clientapp"
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
        alive = {pid for pid in out.stdout.split() if _state(pid) not in ("Z", "X", None)}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)  # SIGKILL is delivered asynchronously


def _state(pid: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


FEDKSEED = {
    "method": "fedkseed",
    "data": asdict(FederatedDataConfig(task="demo", k_shot=6, num_clients=3, test_limit=20)),
    "fedkseed": FedKSeedConfig(peft="bitfit", num_seeds=256, local_steps=2, batch_size=4, seed=3).to_dict(),
    "engine": asdict(EngineConfig(rounds=2, seed=3)),
}


def test_fedbpt_and_fedkseed_on_flower_equal_the_in_process_engine(tmp_path, tiny_models):
    config = {
        "method": "fedbpt",
        "data": asdict(FederatedDataConfig(task="demo", k_shot=6, num_clients=3, test_limit=20)),
        "fedbpt": FedBPTConfig(intrinsic_dim=20, prompt_length=2, local_popsize=4, local_iter=2, seed=3).to_dict(),
        "engine": asdict(EngineConfig(rounds=2, seed=3, dropout=0.2)),
        "blackbox": asdict(BlackBoxConfig(model=str(tiny_models["bert"]))),
    }
    before = _flower_processes()
    fed = LocalFederation(3, workdir=tmp_path / "flower")
    started = []
    try:
        fed.start()
        started = list(fed.processes)
        status = fed.run(json.dumps(config), tmp_path / "flower-run", timeout=600)
        # a second app run on the same deployment: FedKSeed, whose messages are K scalars each way
        seeds_status = fed.run(json.dumps(FEDKSEED | {"blackbox": config["blackbox"]}), tmp_path / "fk", timeout=600)
    finally:
        fed.stop()
    assert status["status"] == "finished:completed", (
        status,
        (tmp_path / "flower" / "superlink.log").read_text()[-3000:],
    )
    assert len(started) == 4 and all(p.poll() is not None for p in started)  # every process we started is gone
    assert _flower_processes(settle=10) <= before  # nor anything they spawned (flower-superexec, app processes)

    method, engine_cfg = build_federated_method(config)
    records = run_federation(method, engine_cfg, tmp_path / "in-process")
    flower_state, flower_meta = load_arrays(tmp_path / "flower-run" / "server_state.safetensors")
    local_state, _ = load_arrays(tmp_path / "in-process" / "server_state.safetensors")
    assert sorted(flower_state) == sorted(local_state)
    for key in local_state:  # the same client means, fitnesses and weights reached the server, bit for bit
        np.testing.assert_array_equal(flower_state[key], local_state[key])
    flower_records = json.loads(flower_meta["engine"])["records"]
    for a, b in zip(records, flower_records):
        assert (a["round"], a["sampled"], a["dropped"], a["aggregated"]) == (
            b["round"],
            b["sampled"],
            b["dropped"],
            b["aggregated"],
        )
        assert a["test_accuracy"] == b["test_accuracy"] and a["global_sigma"] == b["global_sigma"]

    assert seeds_status["status"] == "finished:completed", seeds_status
    config = FEDKSEED | {"blackbox": config["blackbox"]}
    method, engine_cfg = build_federated_method(config)
    run_federation(method, engine_cfg, tmp_path / "fk-in-process")
    flower_state, _ = load_arrays(tmp_path / "fk" / "server_state.safetensors")
    local_state, _ = load_arrays(tmp_path / "fk-in-process" / "server_state.safetensors")
    np.testing.assert_array_equal(flower_state["coefficients"], local_state["coefficients"])
    assert np.count_nonzero(local_state["coefficients"]) > 0
