"""A classification task: labelled texts plus how to phrase them for a frozen model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass
class Split:
    """Texts (optionally pairs) with integer labels."""

    texts: list[str]
    labels: np.ndarray
    text_pairs: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        assert len(self.texts) == len(self.labels), "texts and labels differ in length"
        assert self.text_pairs is None or len(self.text_pairs) == len(self.texts)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Split:
        idx = np.asarray(indices, dtype=np.int64)
        pairs = None if self.text_pairs is None else [self.text_pairs[i] for i in idx]
        return Split([self.texts[i] for i in idx], self.labels[idx], pairs)

    def head(self, n: int) -> Split:
        return self.subset(np.arange(min(n, len(self))))


@dataclass
class Task:
    """Data plus prompt format.

    ``template`` is the paper's prompt with ``{text}``, optional ``{text_pair}`` and ``{mask}``
    (MLM heads fill ``{mask}`` with the mask token; causal heads cut the template there).
    ``encoder_template`` is used by sentence-encoder heads, which read no mask.
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
    description: str = field(default="")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def format(self, split: Split, mask_token: str) -> list[str]:
        return [self._fill(self.template, split, i, mask_token) for i in range(len(split))]

    def format_before_mask(self, split: Split) -> list[str]:
        """The template filled and cut at ``{mask}``: the context a causal LM continues with the label word."""
        return [t.split("\0")[0].rstrip() for t in self.format(split, "\0")]

    def format_for_encoder(self, split: Split) -> list[str]:
        return [self._fill(self.encoder_template, split, i, "") for i in range(len(split))]

    @staticmethod
    def _fill(template: str, split: Split, i: int, mask: str) -> str:
        pair = split.text_pairs[i] if split.text_pairs is not None else ""
        return template.replace("{text}", split.texts[i]).replace("{text_pair}", pair).replace("{mask}", mask)
