"""A classification task: labelled texts plus how to phrase them for a frozen model."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bbfl.exceptions import DataError

# One pass over the template, so braces or placeholder-like strings inside a text are never expanded.
_PLACEHOLDER = re.compile(r"\{(text|text_pair|mask)\}")


@dataclass
class Split:
    """Texts (optionally sentence pairs) with integer class ids.

    Parameters
    ----------
    texts : list of str
        The first (or only) sentence of each example.
    labels : numpy.ndarray
        Class ids, ``int64`` of shape ``[N]``; anything array-like is converted.
    text_pairs : list of str, optional
        The second sentence of each example for pair tasks (MRPC, RTE, SNLI).
    """

    texts: list[str]
    labels: np.ndarray
    text_pairs: list[str] | None = None

    def __post_init__(self) -> None:
        self.texts = list(self.texts)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.text_pairs is not None:
            self.text_pairs = list(self.text_pairs)
        n = len(self.texts)
        if len(self.labels) != n:
            raise DataError(f"split has {n} texts but {len(self.labels)} labels")
        if self.text_pairs is not None and len(self.text_pairs) != n:
            raise DataError(f"split has {n} texts but {len(self.text_pairs)} text pairs")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Split:
        """Examples at ``indices`` (in that order); a boolean mask is also accepted.

        Parameters
        ----------
        indices : sequence of int or numpy.ndarray
            Positions to keep, repeats allowed.

        Returns
        -------
        Split
            A new split; the texts are shared, the label array is copied.
        """
        idx = np.asarray(indices)
        # A boolean mask cast to int would silently select rows 0 and 1.
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).reshape(-1)
        pairs = None if self.text_pairs is None else [self.text_pairs[i] for i in idx]
        return Split([self.texts[i] for i in idx], self.labels[idx], pairs)

    def head(self, n: int) -> Split:
        """The first ``n`` examples (all of them if there are fewer)."""
        return self.subset(np.arange(min(max(n, 0), len(self))))


@dataclass
class Task:
    """Labelled data plus the prompt format of a classification task.

    Parameters
    ----------
    name : str
        Task name (a registry key or a custom name).
    labels : list of str
        Class names; the index is the class id.
    label_words : list of str
        Verbalizer: one word per class, scored at the mask (MLM) or next token (causal LM).
    label_descriptions : list of str
        One short sentence per class, matched by sentence-encoder heads.
    template : str
        The paper's prompt with ``{text}``, optional ``{text_pair}`` and ``{mask}``.
    encoder_template : str
        Prompt for sentence-encoder heads, which read no mask (e.g. ``"{text} {text_pair}"``).
    loss : {"ce", "hinge"}
        BBT's loss for this task (hinge for MRPC, RTE, SNLI).
    train : Split
        The pool that few-shot train/dev sets are drawn from.
    test : Split, optional
        Held-out evaluation data, ``None`` when the source has none.
    description : str
        One line for listings.
    """

    name: str
    labels: list[str]
    label_words: list[str]
    label_descriptions: list[str]
    template: str
    encoder_template: str
    loss: Literal["ce", "hinge"]
    train: Split
    test: Split | None = None
    description: str = ""

    def __post_init__(self) -> None:
        n = len(self.labels)
        for key in ("label_words", "label_descriptions"):
            if len(getattr(self, key)) != n:
                raise DataError(
                    f"task {self.name!r}: {key} has {len(getattr(self, key))} entries {getattr(self, key)} "
                    f"but there are {n} classes {self.labels}"
                )

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.labels)

    def format(self, split: Split, mask_token: str) -> list[str]:
        """Fill ``template`` for every example.

        Parameters
        ----------
        split : Split
            Examples to phrase.
        mask_token : str
            Replaces ``{mask}`` (the tokenizer's mask token for MLM heads).

        Returns
        -------
        list of str
            One prompt per example.
        """
        return _fill_all(self.template, split, mask_token, self.name)

    def format_for_encoder(self, split: Split) -> list[str]:
        """Fill ``encoder_template`` for every example (no mask)."""
        return _fill_all(self.encoder_template, split, "", self.name)


def _fill_all(template: str, split: Split, mask: str, name: str) -> list[str]:
    pairs = split.text_pairs
    if pairs is None and "{text_pair}" in template:
        raise DataError(f"task {name!r}: template {template!r} needs text pairs but the split has none")
    pairs = pairs if pairs is not None else [""] * len(split)
    return [_fill(template, {"text": t, "text_pair": p, "mask": mask}) for t, p in zip(split.texts, pairs)]


def _fill(template: str, values: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
