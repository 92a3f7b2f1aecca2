"""Robust aggregation of vector updates (the rules of Flower's FedMedian, FedTrimmedAvg and Krum).

Pure numpy functions of the stacked client vectors, so every method whose update is a vector (FedBPT's
client means, forward gradients, ...) can use them under either engine.

>>> import numpy as np
>>> honest = np.ones((8, 3)); poisoned = np.full((2, 3), 1e3)
>>> aggregate(np.vstack([honest, poisoned]), rule="median").tolist()
[1.0, 1.0, 1.0]
>>> aggregate(np.vstack([honest, poisoned]), rule="krum", num_malicious=2).tolist()
[1.0, 1.0, 1.0]
"""

from __future__ import annotations

import numpy as np

from bbfl.exceptions import ConfigError

RULES = ("mean", "median", "trimmed", "krum")


def aggregate(
    vectors: np.ndarray,
    weights: np.ndarray | None = None,
    rule: str = "mean",
    trim: float = 0.2,
    num_malicious: int = 0,
) -> np.ndarray:
    """Combine client vectors [n, d] into one [d].

    ``mean``: weighted mean (FedAvg). ``median``: coordinate-wise median (FedMedian). ``trimmed``:
    coordinate-wise mean after dropping the ``trim`` share of smallest and largest values on each side
    (FedTrimmedAvg). ``krum``: the vector with the smallest sum of squared distances to its
    n - num_malicious - 2 nearest others (Blanchard et al., 2017).
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    n = len(vectors)
    if n == 0:
        raise ConfigError("no vectors to aggregate")
    if rule == "mean":
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        return (w / w.sum()) @ vectors
    if rule == "median":
        return np.median(vectors, axis=0)
    if rule == "trimmed":
        if not 0.0 <= trim < 0.5:
            raise ConfigError(f"trim must be in [0, 0.5), got {trim}")
        k = int(np.floor(trim * n))
        ordered = np.sort(vectors, axis=0)
        return ordered[k : n - k].mean(axis=0)
    if rule == "krum":
        return vectors[krum_index(vectors, num_malicious)]
    raise ConfigError(f"unknown aggregation rule {rule!r}; expected one of {', '.join(RULES)}")


def krum_index(vectors: np.ndarray, num_malicious: int) -> int:
    """Index of the Krum choice: the vector closest (sum of squared distances) to its nearest neighbours."""
    n = len(vectors)
    neighbours = max(1, n - num_malicious - 2)
    sq = np.square(vectors[:, None, :] - vectors[None, :, :]).sum(-1)
    scores = [np.sort(np.delete(sq[i], i))[:neighbours].sum() for i in range(n)]
    return int(np.argmin(scores))
