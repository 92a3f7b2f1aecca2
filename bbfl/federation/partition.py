"""Split a dataset's example indices over clients: IID, Dirichlet label skew, or label shards.

Pure functions of (labels, number of clients, seed); every client gets at least ``min_size`` examples.

>>> import numpy as np
>>> labels = np.repeat([0, 1], 50)
>>> parts = partition_labels(labels, 4, scheme="dirichlet", alpha=0.5, seed=0)
>>> sorted(np.concatenate(parts).tolist()) == list(range(100))
True
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from bbfl.exceptions import ConfigError

Scheme = Literal["iid", "dirichlet", "shards"]


def partition_labels(
    labels: np.ndarray,
    num_clients: int,
    *,
    scheme: Scheme = "iid",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Disjoint index arrays, one per client, covering every example.

    Parameters
    ----------
    scheme : ``iid`` (uniform shuffle), ``dirichlet`` (per class, client shares ~ Dir(alpha); small
        alpha = strong label skew, as in FedBPT's alpha = 0.5), or ``shards`` (sort by label, cut into
        ``num_clients * shards_per_client`` shards, deal them out: each client sees few labels).
    min_size : Dirichlet draws are repeated (up to ``max_tries``) until every client has this many. If
        none does (few classes, many clients and a small alpha: most of Dir(0.1)'s mass sits on one or two
        clients per class), the last draw is topped up: each client short of ``min_size`` takes random
        examples from the currently largest client. Only a few examples move, so the skew stays.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if num_clients < 1:
        raise ConfigError(f"`num_clients` must be >= 1, got {num_clients}")
    if n < num_clients * min_size:
        raise ConfigError(f"{n} examples cannot give {num_clients} clients {min_size} example(s) each")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]
    if scheme == "shards":
        return _shards(labels, num_clients, shards_per_client, rng)
    if scheme == "dirichlet":
        if alpha <= 0:
            raise ConfigError(f"`alpha` must be > 0, got {alpha}")
        for _ in range(max(1, max_tries)):
            parts = _dirichlet(labels, num_clients, alpha, rng)
            if min(len(p) for p in parts) >= min_size:
                return parts
        return _top_up(parts, min_size, rng)
    raise ConfigError(f"unknown partition scheme {scheme!r}; expected iid, dirichlet or shards")


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random examples from the largest client to each client below ``min_size`` (caller checked n)."""
    pools = [list(rng.permutation(p)) for p in parts]
    for client in range(len(pools)):
        while len(pools[client]) < min_size:
            donor = max(range(len(pools)), key=lambda c: len(pools[c]))
            pools[client].append(pools[donor].pop())
    return [np.sort(np.array(p, dtype=np.int64)) for p in pools]


def _shards(labels: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    if per_client < 1:
        raise ConfigError(f"`shards_per_client` must be >= 1, got {per_client}")
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, num_clients * per_client)
    dealt = rng.permutation(len(shards))
    return [np.sort(np.concatenate([shards[s] for s in dealt[i::num_clients]])) for i in range(num_clients)]


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """[clients, classes] counts, for logging how skewed a partition is."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
