"""BBT's "true few-shot" sampling: k per class for train and for dev, both from the train pool."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bbfl.data.task import Split
from bbfl.exceptions import DataError


def few_shot(
    split: Split,
    k: int,
    *,
    seed: int,
    dev_k: int | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[Split, Split]:
    """Draw disjoint few-shot train and dev sets with ``k`` and ``dev_k`` examples per class.

    BBT (Sun et al., 2022) samples both sets from the original training split, so no
    held-out labelled data is used for model selection ("true few-shot").

    Parameters
    ----------
    split : Split
        The pool (usually ``task.train``).
    k : int
        Training examples per class (>= 1).
    seed : int
        Seed of the ``numpy.random.default_rng`` that draws both sets.
    dev_k : int, optional
        Dev examples per class (>= 0); defaults to ``k``.
    class_names : sequence of str, optional
        The task's class names (``task.labels``): every class must then be present, and error
        messages name the class. Without it the classes are ``0 .. max(label)``.

    Returns
    -------
    (Split, Split)
        ``(train, dev)``, each shuffled so that classes are interleaved.

    Raises
    ------
    DataError
        If ``k``/``dev_k`` are out of range or a class has fewer than ``k + dev_k`` examples.
    """
    dev_k = k if dev_k is None else dev_k
    if k < 1 or dev_k < 0:
        raise DataError(f"few-shot sizes must be k >= 1 and dev_k >= 0, got k={k}, dev_k={dev_k}")
    rng = np.random.default_rng(seed)
    train_idx: list[int] = []
    dev_idx: list[int] = []
    for c, members in enumerate(_members_by_class(split, class_names)):
        if len(members) < k + dev_k:
            name = f" ({class_names[c]!r})" if class_names is not None else ""
            raise DataError(
                f"class {c}{name} has {len(members)} examples; {k} train + {dev_k} dev per class needed"
            )
        picked = rng.permutation(members)[: k + dev_k]
        train_idx += picked[:k].tolist()
        dev_idx += picked[k:].tolist()
    # Shuffle so that a batch of the first B examples is not a single class.
    return split.subset(rng.permutation(train_idx)), split.subset(rng.permutation(dev_idx))


def _members_by_class(split: Split, class_names: Sequence[str] | None) -> list[np.ndarray]:
    if len(split) == 0:
        raise DataError("cannot sample a few-shot set from an empty split")
    num_classes = len(class_names) if class_names is not None else int(split.labels.max()) + 1
    if split.labels.min() < 0 or split.labels.max() >= num_classes:
        raise DataError(
            f"labels range over {int(split.labels.min())}..{int(split.labels.max())} "
            f"but there are {num_classes} classes"
        )
    return [np.flatnonzero(split.labels == c) for c in range(num_classes)]


def split_train_test(split: Split, test_fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified random ``(train, test)`` split for data that ship without a test set.

    Parameters
    ----------
    split : Split
        All labelled data (e.g. offline Yelp polarity, which has only a train file).
    test_fraction : float
        Share of each class put into the test set, in ``(0, 1)``.
    seed : int
        Seed of the ``numpy.random.default_rng`` that shuffles each class.

    Returns
    -------
    (Split, Split)
        Disjoint ``(train, test)``; each class keeps at least one example on both sides when it
        has two or more.
    """
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(split) == 0:
        raise DataError("cannot split an empty split into train and test")
    rng = np.random.default_rng(seed)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for c in np.unique(split.labels):
        members = rng.permutation(np.flatnonzero(split.labels == c))
        # Stratified, so a small pool (Yelp's 320 rows) keeps its class balance on both sides.
        n_test = min(max(1, round(len(members) * test_fraction)), len(members) - 1) if len(members) > 1 else 0
        test_idx += members[:n_test].tolist()
        train_idx += members[n_test:].tolist()
    return split.subset(rng.permutation(train_idx)), split.subset(rng.permutation(test_idx))
