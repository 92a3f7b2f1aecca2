"""FedBPT on the in-process engine: resume, drop-outs, malformed updates, no pickle, bytes."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from bbfl.experiment import BlackBoxConfig, FederatedDataConfig
from bbfl.federation.engine import EngineConfig, sample_clients
from bbfl.methods.fedbpt import FedBPTConfig
from bbfl.methods.fedbpt.experiment import run_fedbpt_experiment

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
    assert [r["round"] for r in first] == [0, 1, 2]  # round 0 = the starting prompt, evaluated once
    _, resumed = run_fedbpt_experiment(None, None, None, None, resume=run.path)
    assert [r["round"] for r in resumed] == [0, 1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert a["test_accuracy"] == b["test_accuracy"] and a["global_sigma"] == b["global_sigma"]
    rounds = [r["round"] for r in run.metrics() if r.get("phase") == "round"]
    assert rounds == [0, 1, 2, 3, 4]
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["rounds"] == 4


def test_bytes_per_client_round_are_small(tmp_path):
    _, records = _run(
        tmp_path, "bytes", engine=EngineConfig(rounds=1, seed=0), fed=FedBPTConfig(**{**SMALL, "intrinsic_dim": 500})
    )
    rec = records[1]
    assert rec["bytes_down_per_client"] <= 4096 and rec["bytes_up_per_client"] <= 2560, rec
    _, half = _run(
        tmp_path,
        "half",
        engine=EngineConfig(rounds=1, seed=0, transport_dtype="float16"),
        fed=FedBPTConfig(**{**SMALL, "intrinsic_dim": 500}),
    )
    assert half[1]["bytes_down_per_client"] < 0.6 * rec["bytes_down_per_client"]


def test_thirty_percent_dropout_still_converges(tmp_path):
    _, records = _run(tmp_path, "drop", engine=EngineConfig(rounds=6, seed=1, dropout=0.3))
    assert sum(len(r["dropped"]) for r in records) >= 3  # ~0.3 * 4 clients * 6 rounds really dropped
    for r in records[1:]:
        assert set(r["aggregated"]) == set(r["sampled"]) - set(r["dropped"])
    losses = [r["train_loss"] for r in records]
    # the global prompt's loss on all clients' data falls from the starting prompt's (round 0)
    assert min(losses[-2:]) < losses[0] - 0.015, losses
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
    for r in records[1:]:
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
    assert len(records) == 3
    with pytest.raises(ValueError, match="aggregation"):
        FedBPTConfig(aggregation="bogus")
    with pytest.raises(ValueError, match="dropout"):
        EngineConfig(dropout=1.0)
    with pytest.raises(ValueError, match="downlink_covariance"):
        FedBPTConfig(aggregation="fedavg", downlink_covariance=True)


@pytest.mark.parametrize("rule", ["fedavg", "fedbpt"])
def test_one_client_one_round_is_centralised_bbt(tmp_path, minilm, monkeypatch, rule):
    """The one client runs exactly centralised BBT; fedavg keeps its mean, the paper's rule moves w1 of the way.

    Under the paper's rule the server's CMA-ES recombines the client's mean with the old mean (its
    second parent slot, ranked last), so one client and one round is *not* centralised BBT there.
    """
    from bbfl.data import few_shot, load_task
    from bbfl.federation.engine import round_seed, run_federation
    from bbfl.methods.bbt import BBTConfig, SubspaceProjection, run_bbt
    from bbfl.methods.fedbpt import FedBPT

    task = load_task("demo")
    train, _ = few_shot(task.train, 6, seed=0, dev_k=0)
    data = minilm.encode(task, train)
    projection = SubspaceProjection(40, minilm.token_embeddings(".", 4), minilm.embedding_std, seed=1)
    # the engine gives client 0 of round 1 the stream round_seed(seed, 1, 0); BBT gets that seed directly
    seed = round_seed(9, 1, 0)
    bbt_cfg = BBTConfig(intrinsic_dim=40, prompt_length=4, popsize=4, budget=12, eval_every=10**6, seed=seed)
    central = run_bbt(bbt_cfg, minilm, data, data, projection)
    # perturb_rate 0: centralised BBT scores the plain loss, not FedBPT's fitness ratio
    fed_cfg = FedBPTConfig(
        intrinsic_dim=40, prompt_length=4, local_popsize=4, local_iter=3, aggregation=rule, perturb_rate=0.0
    )
    method = FedBPT(fed_cfg, minilm, [data], data, projection, "ce", 1)
    uploads = []
    original = FedBPT.client_update

    def recorded(self, *args):
        update, head = original(self, *args)
        uploads.append(update["mean"].copy())
        return update, head

    monkeypatch.setattr(FedBPT, "client_update", recorded)
    run_federation(method, EngineConfig(rounds=1, seed=9), tmp_path)
    assert method.train_queries == 12 + 1  # 3 generations of 4, plus the client's score of its final mean
    client_mean = central.z_mean.astype(np.float32)  # float32 on the wire
    np.testing.assert_array_equal(uploads[0], client_mean)
    if rule == "fedavg":
        np.testing.assert_array_equal(method.mean, client_mean)
    else:  # the old mean was 0: new mean = w1 * client mean, w1 = the first recombination weight
        w1 = float(method.es.es.sp.weights[0])
        assert 0 < w1 < 1
        np.testing.assert_allclose(method.mean, w1 * client_mean.astype(np.float64), rtol=1e-12, atol=0)


def test_covariance_downlink_is_sent_counted_and_used(tmp_path):
    fed = FedBPTConfig(**SMALL, downlink_covariance=True)
    _, records = _run(tmp_path, "cov", engine=EngineConfig(rounds=2, seed=0), fed=fed)
    _, plain = _run(tmp_path, "plain", engine=EngineConfig(rounds=2, seed=0))
    d = SMALL["intrinsic_dim"]
    assert records[1]["bytes_down_per_client"] - plain[1]["bytes_down_per_client"] >= d * d * 4
    assert records[1]["bytes_up_per_client"] == plain[1]["bytes_up_per_client"]  # clients send no C back
    # round 1's C is the identity, so the runs part only from round 2, once the server has adapted C
    assert records[1]["test_accuracy"] == plain[1]["test_accuracy"]
    assert records[2]["global_sigma"] != plain[2]["global_sigma"]


def test_robust_rules_resist_two_poisoned_clients(tmp_path, monkeypatch):
    """2 of 6 clients upload a mean shifted by +50 per coordinate (finite, under the norm limit)."""
    from bbfl.methods.fedbpt import FedBPT

    original = FedBPT.client_update

    def poisoned(self, client, round_, arrays, header, seed):
        update, head = original(self, client, round_, arrays, header, seed)
        if client in (1, 4):
            update["mean"] = update["mean"] + 50.0
        return update, head

    monkeypatch.setattr(FedBPT, "client_update", poisoned)
    data = FederatedDataConfig(task="demo", k_shot=12, num_clients=6, test_limit=20)
    engine = EngineConfig(rounds=1, seed=0)
    runs = {}
    for name in ("fedavg", "median", "trimmed", "krum"):
        fed = FedBPTConfig(**SMALL, aggregation=name, trim=0.34, num_malicious=2)
        run, records = _run(tmp_path, name, engine=engine, fed=fed, data=data)
        assert records[1]["rejected"] == []  # nothing malformed: only robust aggregation can help
        runs[name] = load_z(run)
    assert np.abs(runs["fedavg"]).mean() > 10  # the mean is dragged ~2/6 * 50 per coordinate
    for rule in ("median", "trimmed", "krum"):
        assert np.abs(runs[rule]).mean() < 3, rule  # the robust rules stay with the honest clients


def load_z(run) -> np.ndarray:
    from bbfl.io import load_arrays

    arrays, _ = load_arrays(run.path / "prompt.safetensors")
    return arrays["z"]


def test_skewed_client_sizes_warn_about_fedbpts_rank_weights(tmp_path, caplog):
    """With the plain loss the server ranks clients by their own-data loss; with sizes 1..11 the user is told
    to use the paper's fitness ratio or fedavg. The default (the ratio), fedavg and IID splits do not warn."""
    skewed = _data(partition="dirichlet", alpha=0.05)  # seed 0: client sizes [11, 1, 11, 1]
    one_round = EngineConfig(rounds=1, seed=0)
    with caplog.at_level("WARNING", logger="bbfl.federation"):
        _run(tmp_path, "rank", engine=one_round, data=skewed, fed=FedBPTConfig(**SMALL, seed=0, perturb_rate=0.0))
    assert "from 1 to 11 examples" in caplog.text and "--aggregation fedavg" in caplog.text
    assert "--perturb-rate 0.5" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="bbfl.federation"):
        _run(tmp_path, "ratio", engine=one_round, data=skewed, fed=FedBPTConfig(**SMALL, seed=0))
        _run(tmp_path, "avg", engine=one_round, data=skewed, fed=FedBPTConfig(**SMALL, seed=0, aggregation="fedavg"))
        _run(tmp_path, "iid", engine=one_round, fed=FedBPTConfig(**SMALL, seed=0, perturb_rate=0.0))
    assert "--aggregation fedavg" not in caplog.text


REPLAY_CASES = {
    "plain": dict(fed=dict(perturb_rate=0.0), engine={}),
    "ratio": dict(fed={}, engine={}),  # the default: the paper's fitness ratio
    "paper": dict(fed=dict(perturb_rate=0.5, downlink_covariance=True), engine=dict(transport_dtype="float16")),
}


@pytest.mark.parametrize("case", sorted(REPLAY_CASES))
def test_replay_uplink_gives_the_dense_state_bit_for_bit(tmp_path, case):
    """Seed + ranks up, the server re-runs each client's CMA-ES: the same global state as the dense uplink."""
    fed, engine = REPLAY_CASES[case]["fed"], REPLAY_CASES[case]["engine"]
    runs = {}
    for uplink in ("dense", "replay"):
        run, records = _run(
            tmp_path,
            uplink,
            engine=EngineConfig(rounds=2, seed=4, **engine),
            fed=FedBPTConfig(**SMALL, **fed, uplink=uplink),
        )
        runs[uplink] = (load_z(run), records)
    (z_dense, dense), (z_replay, replay) = runs["dense"], runs["replay"]
    assert np.abs(z_dense).max() > 0  # the search moved
    np.testing.assert_array_equal(z_replay, z_dense)
    for a, b in zip(dense[1:], replay[1:]):
        assert a["global_sigma"] == b["global_sigma"] and a["test_accuracy"] == b["test_accuracy"]
        assert a["train_queries"] == b["train_queries"]
        assert b["replay_rejected"] == [] and b["replay_seconds"] > 0
        assert b["bytes_up_per_client"] < a["bytes_up_per_client"] and b["bytes_up_per_client"] <= 200


def test_replay_uplink_is_under_300_bytes_at_d500(tmp_path):
    fed = FedBPTConfig(**{**SMALL, "intrinsic_dim": 500, "local_popsize": 5, "local_iter": 8}, uplink="replay")
    _, records = _run(tmp_path, "replay500", engine=EngineConfig(rounds=1, seed=0), fed=fed)
    assert records[1]["bytes_up_per_client"] <= 300, records[1]["bytes_up_per_client"]
    assert records[1]["aggregated"] == [0, 1, 2, 3]


def test_replay_uplink_rejects_what_it_cannot_replay(tmp_path, monkeypatch):
    from bbfl.methods.fedbpt import FedBPT

    original = FedBPT.client_update
    bad = {1: {"ranks": "0" * 12}, 2: {"seed": -5}, 3: {"fitness": float("nan")}}

    def corrupt(self, client, round_, arrays, header, seed):
        update, head = original(self, client, round_, arrays, header, seed)
        return update, {**head, **bad.get(client, {})}

    monkeypatch.setattr(FedBPT, "client_update", corrupt)
    _, records = _run(
        tmp_path, "badreplay", engine=EngineConfig(rounds=1, seed=0), fed=FedBPTConfig(**SMALL, uplink="replay")
    )
    # a seed or fitness out of type/range fails the header spec (the engine's rejection); ranks of the
    # right length that are no permutation fail only when the server replays them; NaN never decodes
    replay = {r["client"]: r["reason"] for r in records[1]["replay_rejected"]}
    header = {r["client"]: r["reason"] for r in records[1]["rejected"]}
    assert "permutation" in replay[1] and "'seed'" in header[2] and "NaN" in header[3], (replay, header)
    assert 0 in records[1]["aggregated"]
    assert np.isfinite(records[1]["test_accuracy"]) and records[1]["global_sigma"] > 0


def test_sigma_floor_is_the_official_no_op_by_default(minilm):
    """global_es.py floors sigma at 0.5, then undoes it whenever the unfloored value is smaller: no floor."""
    from bbfl.data import load_task
    from bbfl.methods.bbt import SubspaceProjection
    from bbfl.methods.fedbpt import FedBPT

    task = load_task("demo")
    data = minilm.encode(task, task.train.head(8))
    projection = SubspaceProjection(40, minilm.token_embeddings(".", 4), minilm.embedding_std, seed=1)
    rng = np.random.default_rng(0)
    step = {
        "solutions": rng.standard_normal((2, 40)) * 0.1,
        "fitnesses": np.array([0.5, 0.7]),
        "sigma_sq": 2 * 4 * 0.2**2,
        "local_mu": 2.0,
        "weights": np.ones(2),
        "final_sigmas": [0.2, 0.2],
    }
    sigmas = {}
    for floor in (0.0, 0.5):
        cfg = FedBPTConfig(**SMALL, sigma0=0.3, min_sigma=floor)
        method = FedBPT(cfg, minilm, [data, data], data, projection, "ce", 2)
        method._apply(step)
        sigmas[floor] = (method.sigma, method.scale_sigma)
    assert FedBPTConfig().min_sigma == 0.0
    sent, unfloored = sigmas[0.0]
    assert sent == unfloored < 0.5  # official: clients get the rescaled value, however small
    assert sigmas[0.5] == (0.5, unfloored)  # the named variant: a floor that holds


def test_perturbed_copies_are_fresh_each_round_from_the_clients_stream(minilm):
    from bbfl.data import load_task
    from bbfl.methods.bbt import SubspaceProjection
    from bbfl.methods.fedbpt import FedBPT

    task = load_task("demo")
    data = minilm.encode(task, task.train.head(8))
    projection = SubspaceProjection(40, minilm.token_embeddings(".", 4), minilm.embedding_std, seed=1)
    method = FedBPT(FedBPTConfig(**SMALL, perturb_rate=0.5), minilm, [data, data], data, projection, "ce", 2)

    def ids(client, seed):
        return torch.cat(method._perturbed_copy(client, seed).input_ids)

    assert torch.equal(ids(0, 11), ids(0, 11))  # a pure function of the client's round stream
    assert not torch.equal(ids(0, 11), ids(0, 12))  # another round (or run) draws another copy
    assert not torch.equal(ids(0, 11), torch.cat(data.input_ids))
