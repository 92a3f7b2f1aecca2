"""FedBPT on the in-process engine: resume, drop-outs, malformed updates, no pickle, bytes."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from bbfl.federation.engine import EngineConfig, sample_clients
from bbfl.methods.fedbpt import FedBPTConfig
from bbfl.pipeline import BlackBoxConfig, FederatedDataConfig, run_fedbpt_experiment

SMALL = dict(intrinsic_dim=40, prompt_length=4, local_popsize=4, local_iter=3)


def _data(**kw):
    return FederatedDataConfig(task="demo", k_shot=12, num_clients=4, test_limit=40, **kw)


def _run(tmp_path, name, engine=None, fed=None, data=None, **kw):
    engine = engine or EngineConfig(rounds=4, seed=3)
    return run_fedbpt_experiment(
        data or _data(), fed or FedBPTConfig(**SMALL), engine, BlackBoxConfig(), out_root=tmp_path / name, **kw
    )


def test_resume_equals_uninterrupted(tmp_path):
    _, straight = _run(tmp_path, "straight")
    run, first = _run(tmp_path, "split", stop_after=2)
    assert [r["round"] for r in first] == [1, 2]
    _, resumed = run_fedbpt_experiment(None, None, None, None, resume=run.path)
    assert [r["round"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert a["test_accuracy"] == b["test_accuracy"] and a["global_sigma"] == b["global_sigma"]
    rounds = [r["round"] for r in run.metrics() if r.get("phase") == "round"]
    assert rounds == [1, 2, 3, 4]
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["rounds"] == 4


def test_bytes_per_client_round_are_small(tmp_path):
    _, records = _run(
        tmp_path, "bytes", engine=EngineConfig(rounds=1, seed=0), fed=FedBPTConfig(**{**SMALL, "intrinsic_dim": 500})
    )
    rec = records[0]
    assert rec["bytes_down_per_client"] <= 4096 and rec["bytes_up_per_client"] <= 2560, rec
    _, half = _run(
        tmp_path,
        "half",
        engine=EngineConfig(rounds=1, seed=0, transport_dtype="float16"),
        fed=FedBPTConfig(**{**SMALL, "intrinsic_dim": 500}),
    )
    assert half[0]["bytes_down_per_client"] < 0.6 * rec["bytes_down_per_client"]


def test_dropout_rounds_still_aggregate_and_are_logged(tmp_path):
    engine = EngineConfig(rounds=4, seed=1, dropout=0.3)
    _, records = _run(tmp_path, "drop", engine=engine)
    dropped = sum(len(r["dropped"]) for r in records)
    assert dropped > 0
    for r in records:
        assert set(r["aggregated"]) == set(r["sampled"]) - set(r["dropped"])
    assert all(np.isfinite(r["test_accuracy"]) for r in records)


def test_sampling_is_seeded_per_round():
    a = sample_clients(10, 3, 0.0, seed=5, round_=2)
    assert a == sample_clients(10, 3, 0.0, seed=5, round_=2)
    assert len(a[0]) == 3 and a != sample_clients(10, 3, 0.0, seed=5, round_=3)


def test_malformed_update_is_rejected_and_round_proceeds(tmp_path, monkeypatch):
    from bbfl.methods.fedbpt import FedBPT

    original = FedBPT.client_update

    def poisoned(self, client, round_, arrays, header, seed):
        update, head = original(self, client, round_, arrays, header, seed)
        if client == 1:
            update["mean"] = np.full_like(update["mean"], np.nan)
        if client == 2:
            update["mean"] = update["mean"][:-1]
        return update, head

    monkeypatch.setattr(FedBPT, "client_update", poisoned)
    _, records = _run(tmp_path, "bad", engine=EngineConfig(rounds=2, seed=0))
    for r in records:
        reasons = {x["client"]: x["reason"] for x in r["rejected"]}
        assert "NaN" in reasons[1] and "shape" in reasons[2]
        assert sorted(r["aggregated"]) == [0, 3]


def test_no_pickle_is_loaded(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle.load(s) called")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    run, _ = _run(tmp_path, "nopickle", engine=EngineConfig(rounds=2, seed=0), stop_after=1)
    run_fedbpt_experiment(None, None, None, None, resume=run.path)


def test_fedavg_option_and_config_errors(tmp_path):
    _, records = _run(
        tmp_path, "avg", engine=EngineConfig(rounds=2, seed=0), fed=FedBPTConfig(**SMALL, aggregation="fedavg")
    )
    assert len(records) == 2
    with pytest.raises(ValueError, match="aggregation"):
        FedBPTConfig(aggregation="median")
    with pytest.raises(ValueError, match="dropout"):
        EngineConfig(dropout=1.0)
