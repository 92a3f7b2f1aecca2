"""BBT's "true few-shot" sampling: k per class for train and for dev, both from the train pool."""

from __future__ import annotations

import numpy as np

from bbfl.data.task import Split
from bbfl.exceptions import DataError


def few_shot(split: Split, k: int, *, seed: int, dev_k: int | None = None) -> tuple[Split, Split]:
    """Disjoint (train, dev) with ``k`` and ``dev_k`` (default ``k``) examples per class, seeded."""
    dev_k = k if dev_k is None else dev_k
    if k < 1 or dev_k < 0:
        raise DataError(f"k_shot must be >= 1 and dev_k >= 0, got {k}, {dev_k}")
    rng = np.random.default_rng(seed)
    train_idx, dev_idx = [], []
    for c in np.unique(split.labels):
        members = np.flatnonzero(split.labels == c)
        if len(members) < k + dev_k:
            raise DataError(f"class {int(c)} has {len(members)} examples; {k} train + {dev_k} dev per class needed")
        picked = rng.permutation(members)[: k + dev_k]
        train_idx += picked[:k].tolist()
        dev_idx += picked[k:].tolist()
    return split.subset(rng.permutation(train_idx)), split.subset(rng.permutation(dev_idx))


def split_train_test(split: Split, test_fraction: float, seed: int) -> tuple[Split, Split]:
    """Random (train, test) split for data that ship without a test set."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(split))
    n_test = max(1, int(round(len(split) * test_fraction)))
    return split.subset(order[n_test:]), split.subset(order[:n_test])


def holdout_per_client(splits: list[Split], test_fraction: float, seed: int) -> tuple[list[Split], list[Split]]:
    """Each client's own (train, test): personalised methods are scored on data from the client's distribution."""
    pairs = [split_train_test(s, test_fraction, seed + i) for i, s in enumerate(splits)]
    return [train for train, _ in pairs], [test for _, test in pairs]
