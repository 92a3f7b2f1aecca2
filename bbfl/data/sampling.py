"""BBT's "true few-shot" sampling: k per class for train and for dev, both from the train pool."""

from __future__ import annotations

import logging

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


TEST_SAMPLE_SEED = 0  # one sample per (test file, N): every run and method scores the same rows


def stratified_rows(labels: np.ndarray, n: int, seed: int = TEST_SAMPLE_SEED) -> np.ndarray:
    """Sorted indices of ``n`` rows drawn at random per class, in proportion to the class sizes.

    Largest-remainder quotas, every class at least one row when ``n`` allows: a file sorted by label
    (CR's and MPQA's test files) gives the same class mix as the whole file, not its first class.
    """
    if n < 1:
        raise DataError(f"--test-limit should be >= 1, got {n}")
    if n >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(labels)
    take = np.floor(quota).astype(np.int64)
    if n >= len(classes):
        take = np.maximum(take, 1)
    while take.sum() > n:  # the minimum of one pushed the total over: trim the largest quotas
        take[np.argmax(np.where(take > 1, take - quota, -np.inf))] -= 1
    order = np.argsort(-(quota - take), kind="stable")  # the rest go to the largest remainders
    take[order[: n - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), t, replace=False) for c, t in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def limit_test(split: Split, limit: int | None, names: list[str] | None = None) -> Split:
    """The test split scored: all of it, or a seeded stratified sample of ``limit`` rows (``--test-limit``).

    The sample's rows are kept in ``Split.rows``; a scored set holding one class is warned about.
    """
    test = split
    if limit is not None:
        rows = stratified_rows(split.labels, limit)
        if len(rows) < len(split):
            test = split.subset(rows)
            test.rows = rows
    present = np.unique(test.labels)
    if len(present) == 1:
        name = names[int(present[0])] if names else str(int(present[0]))
        logging.getLogger("bbfl.data").warning(
            "the %d test examples scored all have class %r: accuracy then measures one class only%s",
            len(test),
            name,
            "" if limit is None else " (raise --test-limit)",
        )
    return test
