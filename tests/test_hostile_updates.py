"""Hostile update headers are rejected, logged and survived; run directories that are broken say so.

Every federated method (FedBPT, ZooPFL, FwdLLM, FedKSeed, FedOne) is built small on a real model
(tiny random BERT) and its honest client update passes its own header spec; every field of that
header is then broken (missing, NaN, a string, 1e300, out of range, ...) and must be an
``InvalidUpdate`` with a message. A seeded random mutation run does the same at volume
(``BBFL_FUZZ_EXAMPLES`` headers per method, 3,000 by default).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bbfl.blackbox import LocalBlackBox
from bbfl.data import load_task
from bbfl.exceptions import CheckpointError, ConfigError
from bbfl.federation.engine import EngineConfig, run_clients_in_process, run_federation
from bbfl.federation.headers import Field, validate_header
from bbfl.federation.wire import InvalidUpdate
from bbfl.io import load_arrays
from tests.fedone_keyword import small_fedone

FUZZ_EXAMPLES = int(os.environ.get("BBFL_FUZZ_EXAMPLES", "3000"))


def _fedbpt(tiny_models, **overrides):
    from bbfl.experiment import BlackBoxConfig, FederatedDataConfig, prepare_federated_data
    from bbfl.methods.fedbpt import FedBPTConfig
    from bbfl.methods.fedbpt.experiment import fedbpt_method

    small = dict(intrinsic_dim=20, prompt_length=2, local_popsize=4, local_iter=2, seed=3)
    cfg = FedBPTConfig(**{**small, **overrides})
    data = FederatedDataConfig(task="demo", k_shot=6, num_clients=3, test_limit=10)
    task, splits, test = prepare_federated_data(data, cfg.seed)
    bb = BlackBoxConfig(model=str(tiny_models["bert"])).build()
    return fedbpt_method(cfg, EngineConfig(rounds=2, seed=3), bb, task, splits, test)


def _build(name: str, tiny_models):
    if name == "fedbpt":
        return _fedbpt(tiny_models)
    if name == "fedbpt-replay":  # seed + ranks instead of a mean and its step sizes
        return _fedbpt(tiny_models, uplink="replay")
    task = load_task("demo")
    if name == "fedone":
        return small_fedone()
    bb = LocalBlackBox(str(tiny_models["bert"]), prompt_attention="full")
    clients = [bb.encode(task, task.train.subset(range(i, 24, 3))) for i in range(3)]
    test = bb.encode(task, task.test.head(8))
    if name == "zoopfl":
        from bbfl.methods.zoopfl import ZooPFL, ZooPFLConfig

        cfg = ZooPFLConfig(hidden_dim=16, latent_dim=4, client_embed_dim=2, prompt_length=2, local_steps=2)
        return ZooPFL(cfg, bb, clients, clients, test, task.num_classes)
    if name == "fwdllm":
        from bbfl.methods.fwdllm import FwdLLM, FwdLLMConfig

        return FwdLLM(FwdLLMConfig(peft="bitfit", seed=7, batch_size=4, uplink="seed"), bb, clients, test, rounds=2)
    from bbfl.methods.fedkseed import FedKSeed, FedKSeedConfig

    pro = name == "fedkseed-pro"  # + per-seed |clip(s)| sums and step counts
    cfg = FedKSeedConfig(peft="bitfit", num_seeds=64, local_steps=2, batch_size=4, lr=0.05, seed=7, pro=pro)
    return FedKSeed(cfg, bb, clients, test)


METHODS = ["fedbpt", "fedbpt-replay", "zoopfl", "fwdllm", "fedkseed", "fedkseed-pro", "fedone"]


@pytest.fixture(scope="module")
def honest(tiny_models):
    """Per method: (method, client 1's honest update header from a real round through the engine's wire)."""
    out = {}
    for name in METHODS:
        method = _build(name, tiny_models)
        arrays, header = method.downlink(1)
        _, (reply,) = run_clients_in_process(method, EngineConfig(rounds=1), 1, [1], arrays, header)
        out[name] = method, reply.header
        out[name + ":arrays"] = reply.arrays
    return out


def _breakages(name: str, field: Field) -> list:
    """Values that must never pass as ``field`` (whatever else the spec allows)."""
    bad = [float("nan"), float("inf"), -float("inf"), "1", None, True, {"x": 1}]
    if field.kind == "str":
        lo, hi = field.length
        return [*[v for v in bad if v != "1"], 5, ["0"], "0" * (hi + 1)] + (["0" * (lo - 1)] if lo > 0 else [])
    scalar_bad = [*bad, [1]]
    if field.kind == "int":
        scalar_bad += [1e300, 2.5, 2**70]
    if field.low is not None:
        scalar_bad.append(field.low - 1)
    if field.high is not None:
        scalar_bad.append(field.high * 2 + 1)
    if field.length is None:
        return scalar_bad
    lo, hi = field.length
    item = 1 if field.kind == "int" else 0.5
    lists = [[v] * max(lo, 1) for v in scalar_bad if not isinstance(v, list)] + ["[1]", 3, [item] * (hi + 1)]
    return lists + ([[item] * (lo - 1)] if lo > 0 else [])


@pytest.mark.parametrize("name", METHODS)
def test_honest_header_passes_and_every_broken_field_is_rejected(honest, name):
    method, header = honest[name]
    spec = method.header_spec(1)
    validate_header(header, spec)  # an honest update is never rejected by its own spec
    assert set(spec) == set(header)
    tried = 0
    for key, field in spec.items():
        with pytest.raises(InvalidUpdate, match=key):
            validate_header({k: v for k, v in header.items() if k != key}, spec)
        for value in _breakages(name, field):
            with pytest.raises(InvalidUpdate, match=key):
                validate_header({**header, key: value}, spec)
            tried += 1
    with pytest.raises(InvalidUpdate, match="unexpected"):
        validate_header({**header, "extra": 1}, spec)
    for not_a_dict in ([], "x", None, 3):
        with pytest.raises(InvalidUpdate, match="JSON object"):
            validate_header(not_a_dict, spec)
    assert tried >= 10 * len(spec)


def test_examples_are_bounded_by_the_clients_known_size(honest):
    method, header = honest["fedbpt"]
    size = len(method.clients[1])
    validate_header({**header, "examples": size}, method.header_spec(1))
    with pytest.raises(InvalidUpdate, match=f"examples.*<= {size}"):
        validate_header({**header, "examples": size + 1}, method.header_spec(1))
    for examples in (-5, 0, 1e300, 2**70):
        with pytest.raises(InvalidUpdate, match="examples"):
            validate_header({**header, "examples": examples}, method.header_spec(1))
    with pytest.raises(InvalidUpdate, match=r"sigmas.*\[0\]"):
        validate_header({**header, "sigmas": [1e200, *header["sigmas"][1:]]}, method.header_spec(1))
    with pytest.raises(InvalidUpdate, match="local_mu"):
        validate_header({**header, "local_mu": 0}, method.header_spec(1))  # ZeroDivisionError at 98f65c7


def test_fedkseed_pro_history_arrays_are_checked_per_client(honest):
    """FedKSeed-Pro's |clip(s)| sums and step counts: an honest pair passes; inflated ones are rejected
    before they reach the seed probabilities every client samples from."""
    method, header = honest["fedkseed-pro"]
    arrays = honest["fedkseed-pro:arrays"]
    method.check_update(1, arrays, header)
    steps, clip = method.config.local_steps, method.config.pro_clip
    k = int(np.argmax(arrays["counts"]))
    bad = {
        "counts": [arrays["counts"] * 1000, arrays["counts"] - 2 * steps, arrays["counts"] + 0.5],
        "abs_clipped": [arrays["abs_clipped"] - 1, np.where(np.arange(64) == k, clip * (steps + 1), 0)],
    }
    for key, values in bad.items():
        for value in values:
            with pytest.raises(InvalidUpdate, match=key):
                method.check_update(1, {**arrays, key: value.astype(np.float32)}, header)


def _mutated(value, rng: random.Random):
    choices = [
        lambda: float("nan"),
        lambda: rng.choice([1e300, -1e300, float("inf")]),
        lambda: rng.randint(-(2**80), 2**80),
        lambda: rng.choice(["", "x", "NaN", None, True, False, {}, []]),
        lambda: [value] * rng.randint(0, 40),
        lambda: value * rng.choice([-1, 1e6, 1e-30]) if isinstance(value, (int, float)) else [],
        lambda: [float("nan")] * (len(value) if isinstance(value, list) else 1),
    ]
    return rng.choice(choices)()


@pytest.mark.parametrize("name", METHODS)
def test_fuzz_headers_end_in_a_rejection_or_pass_a_finite_spec(honest, name):
    """Seeded random mutation of honest headers: each one is rejected with a reason, or it passes and then
    every value in it is finite and in range (nothing unhandled, nothing non-finite accepted)."""
    method, header = honest[name]
    spec, rng = method.header_spec(1), random.Random(f"headers-{name}")
    rejected = 0
    for _ in range(FUZZ_EXAMPLES):
        mutant = dict(header)
        for key in rng.sample(sorted(spec) + ["junk"], rng.randint(1, 3)):
            if rng.random() < 0.15:
                mutant.pop(key, None)
            else:
                mutant[key] = _mutated(header.get(key, 1), rng)
        try:
            validate_header(mutant, spec)
        except InvalidUpdate as exc:
            assert exc.reason
            rejected += 1
            continue
        flat = [v for k in spec for v in (mutant[k] if isinstance(mutant[k], list) else [mutant[k]])]
        flat = [v for v in flat if not isinstance(v, str)]  # a str field passed its length check
        assert all(math.isfinite(v) for v in flat), mutant
    print(f"header fuzz {name}: {FUZZ_EXAMPLES} inputs, {rejected} rejected, 0 crashes")
    assert rejected >= FUZZ_EXAMPLES // 2


def _tampering_runner(tamper: dict):
    """The in-process runner, except that client 0's header is replaced in the rounds of ``tamper``."""

    def run(method, config, round_, clients, arrays, header):
        size, replies = run_clients_in_process(method, config, round_, clients, arrays, header)
        for reply in replies:
            if reply.client == 0 and round_ in tamper:
                reply.header = tamper[round_](dict(reply.header))
        return size, replies

    return run


def test_nan_sigma_and_absurd_examples_under_fedavg_are_rejected_and_the_run_finishes(tiny_models, tmp_path):
    """At 98f65c7 round 1's NaN sigma was aggregated and checkpointed, and every later round crashed."""
    method = _fedbpt(tiny_models, aggregation="fedavg")
    tamper = {
        1: lambda h: {**h, "sigmas": [float("nan")] * len(h["sigmas"])},
        2: lambda h: {**h, "examples": 1e300},  # would hold all of FedAvg's weight
        3: lambda h: {k: v for k, v in h.items() if k != "fitness"},
    }
    records = run_federation(method, EngineConfig(rounds=3, seed=3), tmp_path, runner=_tampering_runner(tamper))
    assert [r["round"] for r in records] == [0, 1, 2, 3]  # the run went on to the end
    reasons = ["sigmas", "examples", "fitness"]
    for record, reason in zip(records[1:], reasons):
        assert [r["client"] for r in record["rejected"]] == [0]
        assert reason in record["rejected"][0]["reason"]
        assert record["aggregated"] == [1, 2]
    assert math.isfinite(method.sigma) and method.sigma < 10 and np.all(np.isfinite(method.mean))
    arrays, meta = load_arrays(tmp_path / "server_state.safetensors")
    assert all(np.all(np.isfinite(a)) for a in arrays.values())
    json.loads(meta["method"], parse_constant=lambda c: pytest.fail(f"{c} checkpointed"))


def test_dp_noise_comes_from_a_server_secret_not_from_config(tiny_models, tmp_path):
    """Two runs of the same configuration add different noise; the secret is only in the server checkpoint."""
    engine = EngineConfig(rounds=1, seed=3)
    means = []
    for run in ("a", "b"):
        method = _fedbpt(tiny_models, aggregation="fedavg", dp_clip=0.05, dp_noise=2.0)
        run_federation(method, engine, tmp_path / run)
        means.append(method.mean.copy())
        secret = format(method.server_secret, "x")
        assert (
            json.loads(load_arrays(tmp_path / run / "server_state.safetensors")[1]["engine"])["server_secret"] == secret
        )
        others = [p for p in (tmp_path / run).rglob("*") if p.is_file() and p.suffix != ".safetensors"]
        assert others and not any(secret in p.read_text() for p in others)  # not in rounds.json or elsewhere
    # same config, same clients, same seed: only the server's secret differs between the two runs
    assert np.abs(means[0] - means[1]).mean() > 0.005


def test_broken_checkpoint_is_a_checkpoint_error_naming_the_file(tiny_models, tmp_path):
    method = _fedbpt(tiny_models)
    run_federation(method, EngineConfig(rounds=1, seed=3), tmp_path)
    ckpt = tmp_path / "server_state.safetensors"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="server_state.safetensors"):
        run_federation(_fedbpt(tiny_models), EngineConfig(rounds=2, seed=3), tmp_path)
    arrays, meta = load_arrays_from(good)
    from bbfl.io import save_arrays

    save_arrays(ckpt, arrays, {**meta, "engine": '{"round": "1"'})
    with pytest.raises(CheckpointError, match="garbled header"):
        run_federation(_fedbpt(tiny_models), EngineConfig(rounds=2, seed=3), tmp_path)


def load_arrays_from(blob: bytes):
    from safetensors.numpy import load

    size = int.from_bytes(blob[:8], "little")
    return load(blob), json.loads(blob[8 : 8 + size])["__metadata__"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}
    return subprocess.run(
        [sys.executable, "-m", "bbfl.cli", "fedbpt", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_resume_of_a_truncated_run_directory_exits_2_with_one_line(tiny_models, tmp_path):
    from bbfl.experiment import BlackBoxConfig, FederatedDataConfig
    from bbfl.methods.fedbpt import FedBPTConfig
    from bbfl.methods.fedbpt.experiment import run_fedbpt_experiment

    data = FederatedDataConfig(task="demo", k_shot=4, num_clients=2, test_limit=8)
    fed = FedBPTConfig(intrinsic_dim=10, prompt_length=2, local_popsize=4, local_iter=2, seed=3)
    bb = BlackBoxConfig(model=str(tiny_models["bert"]))
    run, _ = run_fedbpt_experiment(data, fed, EngineConfig(rounds=2, seed=3), bb, tmp_path, stop_after=1)
    run_dir = run.path
    for name in ("server_state.safetensors", "config.json"):
        path: Path = run_dir / name
        path.write_bytes(path.read_bytes()[:40])
        resumed = _cli("--resume", str(run_dir))
        assert resumed.returncode == 2, resumed.stdout + resumed.stderr
        assert "Traceback" not in resumed.stdout + resumed.stderr
        error = [line for line in resumed.stdout.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and name in error[0] and "truncated" in error[0], resumed.stdout


@pytest.mark.parametrize("name", ["fedbpt", "fwdllm"])
def test_eval_every_scores_fewer_rounds_and_trains_the_same_state(tiny_models, tmp_path, name):
    """--eval-every thins the test curve (round 0 and the last always scored) and changes nothing trained."""
    states, records = [], []
    for every in (1, 2):
        method = _build(name, tiny_models)
        records.append(run_federation(method, EngineConfig(rounds=3, eval_every=every, seed=3), tmp_path / str(every)))
        states.append(method.state()[0])
    assert [("test_accuracy" in r) for r in records[0]] == [True] * 4
    assert [("test_accuracy" in r) for r in records[1]] == [True, False, True, True]
    assert records[0][-1]["test_accuracy"] == records[1][-1]["test_accuracy"]
    assert states[0].keys() == states[1].keys()
    assert all(np.array_equal(states[0][k], states[1][k]) for k in states[0])
    with pytest.raises(ConfigError, match="eval_every"):
        EngineConfig(rounds=3, eval_every=0)
