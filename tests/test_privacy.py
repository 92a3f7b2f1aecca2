"""Differential privacy for vector updates: clipping bounds a client's influence, noise is calibrated and replayable."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from bbfl.exceptions import ConfigError
from bbfl.experiment import BlackBoxConfig, FederatedDataConfig, prepare_federated_data
from bbfl.federation.engine import EngineConfig, run_federation
from bbfl.federation.privacy import add_noise, clip_to_norm, noise_std
from bbfl.methods.fedbpt import FedBPT, FedBPTConfig
from bbfl.methods.fedbpt.experiment import fedbpt_method

SMALL = dict(intrinsic_dim=20, prompt_length=2, local_popsize=4, local_iter=2, seed=3, aggregation="fedavg")


def test_clip_and_noise_are_what_they_claim():
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.normal(size=50) * rng.uniform(0.1, 10)
        clipped = clip_to_norm(v, 2.0)
        assert np.linalg.norm(clipped) <= 2.0 + 1e-9
        assert np.allclose(clipped / np.linalg.norm(clipped), v / np.linalg.norm(v))  # direction kept
    std = noise_std(clip=2.0, noise_multiplier=1.5, weights=np.array([1, 1, 2]))
    assert std == pytest.approx(1.5 * 2.0 * 0.5)  # the largest client holds half of the weight
    noise = add_noise(np.zeros(200_000), std, secret=1, round_=4)
    assert noise.std() == pytest.approx(std, rel=0.01) and abs(noise.mean()) < 0.01
    np.testing.assert_array_equal(noise, add_noise(np.zeros(200_000), std, secret=1, round_=4))  # replayable
    assert not np.array_equal(noise, add_noise(np.zeros(200_000), std, secret=1, round_=5))


def test_dp_needs_a_clip_and_an_averaging_rule():
    with pytest.raises(ConfigError, match="dp_clip"):
        FedBPTConfig(**{**SMALL, "aggregation": "fedbpt"}, dp_clip=1.0)
    with pytest.raises(ConfigError, match="needs `dp_clip`"):
        FedBPTConfig(**SMALL, dp_noise=1.0)


def test_fedbpt_with_dp_clips_every_client_and_resumes_to_the_same_noisy_mean(tiny_models, tmp_path):
    data = FederatedDataConfig(task="demo", k_shot=6, num_clients=3, test_limit=10)
    engine = EngineConfig(rounds=2, seed=3)

    def build(**dp):
        cfg = FedBPTConfig(**SMALL, **dp)
        task, splits, test = prepare_federated_data(data, cfg.seed)
        bb = BlackBoxConfig(model=str(tiny_models["bert"])).build()
        return fedbpt_method(cfg, engine, bb, task, splits, test)

    method: FedBPT = build(dp_clip=0.05, dp_noise=0.0)
    arrays, header = method.downlink(1)
    update, _ = method.client_update(0, 1, arrays, header, seed=9)
    assert np.linalg.norm(update["mean"] - arrays["mean"]) <= 0.05 + 1e-6  # sigma 1 moves it far more unclipped

    noisy = build(dp_clip=0.05, dp_noise=2.0)
    # the noise comes from a server secret drawn per run: resume a copy of this run's round-1 directory
    copy_round_1 = lambda r: r["round"] == 1 and shutil.copytree(tmp_path / "once", tmp_path / "twice")  # noqa: E731
    run_federation(noisy, engine, tmp_path / "once", on_round=copy_round_1)
    resumed = build(dp_clip=0.05, dp_noise=2.0)
    run_federation(resumed, engine, tmp_path / "twice")
    np.testing.assert_array_equal(resumed.mean, noisy.mean)  # the server noise is replayed, not redrawn
    clean = build(dp_clip=0.05, dp_noise=0.0)
    run_federation(clean, engine, tmp_path / "clean")
    # 3 equal-ish clients: noise std ~ 2 * 0.05 / 3 per coordinate per round, far above float error
    assert np.abs(noisy.mean - clean.mean).mean() > 0.01
