"""Differential privacy for vector updates: client-side fixed clipping + server-side Gaussian noise.

The scheme of Flower's ``DifferentialPrivacyClientSideFixedClipping`` (Andrew et al., 2021; McMahan et
al., 2018): each client clips its update (its change to the global vector) to L2 norm ``clip`` before
sending; the server adds N(0, (noise_multiplier * clip * max_weight / total_weight)^2) per coordinate to
the weighted mean, i.e. noise scaled to one client's largest possible influence on it. We do not run a
privacy accountant: the (epsilon, delta) of a run follows from noise_multiplier, the sampling rate and
the number of rounds with any standard RDP accountant.

>>> import numpy as np
>>> clip_to_norm(np.array([3.0, 4.0]), 1.0).tolist()
[0.6000000000000001, 0.8]
>>> clip_to_norm(np.array([0.3, 0.4]), 1.0).tolist()
[0.3, 0.4]
"""

from __future__ import annotations

import secrets

import numpy as np

from bbfl.exceptions import ConfigError


def check_dp(clip: float | None, noise_multiplier: float) -> None:
    """Validate a (clip, noise_multiplier) pair from a config."""
    if clip is not None and clip <= 0:
        raise ConfigError(f"`dp_clip` must be > 0 or None, got {clip}")
    if noise_multiplier < 0:
        raise ConfigError(f"`dp_noise` must be >= 0, got {noise_multiplier}")
    if noise_multiplier > 0 and clip is None:
        raise ConfigError("`dp_noise` > 0 needs `dp_clip` (the noise is scaled to the clipping norm)")


def clip_to_norm(vector: np.ndarray, clip: float) -> np.ndarray:
    """``vector`` scaled down to L2 norm ``clip`` if it is longer (direction kept)."""
    norm = float(np.linalg.norm(vector))
    return vector if norm <= clip else vector * (clip / norm)


def noise_std(clip: float, noise_multiplier: float, weights: np.ndarray) -> float:
    """Per-coordinate std of the server noise for a mean with these client weights."""
    weights = np.asarray(weights, dtype=np.float64)
    return noise_multiplier * clip * float(weights.max() / weights.sum())


def new_server_secret() -> int:
    """128 random bits only the server holds (the engine keeps them in its checkpoint, never in config.json)."""
    return secrets.randbits(128)


def add_noise(mean: np.ndarray, std: float, secret: int | None, round_: int) -> np.ndarray:
    """``mean`` + N(0, std^2), drawn from (server secret, round).

    A resumed run replays the same noise (the secret is in the server's checkpoint); a client, which
    holds config.json and its seed but not the secret, cannot regenerate and subtract it.
    """
    if std == 0:
        return mean
    if secret is None:
        raise ConfigError("server-side DP noise needs the server's secret (the engine sets `server_secret`)")
    return mean + np.random.default_rng([secret, round_, 0xD9]).normal(0.0, std, size=mean.shape)
