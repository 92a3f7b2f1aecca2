"""A classification task: labelled texts plus how to phrase them for a frozen model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np


@dataclass
class Split:
    """Texts (optionally pairs) with integer labels."""

    texts: list[str]
    labels: np.ndarray
    text_pairs: list[str] | None = None
    # for a sample of a loaded split (``--test-limit``): the rows it took, recorded in config.json
    rows: np.ndarray | None = field(default=None, compare=False, repr=False)

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
    ``encoder_template`` is used by sentence-encoder heads, which read no mask. ``causal_template`` and
    ``causal_label_words``, when set, replace ``template`` / ``label_words`` for causal LMs
    (:meth:`for_head`): the registry gives them where a cloze template reads badly to a causal LM.
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
    columns: dict[str, str | None] = field(default_factory=dict)  # text_col / pair_col / label_col read
    defaulted: list[str] = field(default_factory=list)  # spec keys no spec gave (filled with defaults)
    causal_template: str = ""  # "" = causal LMs read ``template``
    causal_label_words: list[str] = field(default_factory=list)  # [] = ``label_words``

    SPEC_KEYS = (
        "labels",
        "label_words",
        "label_descriptions",
        "template",
        "encoder_template",
        "loss",
        "causal_template",
        "causal_label_words",
    )

    def for_head(self, head: str) -> Task:
        """The task as a model with this head reads it: a causal head gets the causal phrasing, if any.

        >>> from bbfl.data import load_task
        >>> load_task("demo").for_head("causal").template
        'Review: {text}\\nSentiment: {mask}'
        """
        if head != "causal" or not self.causal_template:
            return self
        words = self.causal_label_words or self.label_words
        return replace(self, template=self.causal_template, label_words=list(words))

    def spec_record(self) -> dict:
        """The resolved spec (classes, template, words, descriptions, loss, columns) for config.json.

        ``load_task(name, data_dir=..., **record)`` rebuilds this task without the spec file.
        """
        record = {k: (list(v) if isinstance(v, list) else v) for k, v in vars(self).items() if k in self.SPEC_KEYS}
        return {**record, **{k: v for k, v in self.columns.items() if v is not None}}

    def describe(self) -> str:
        """What the model reads: the template and the verbalizer, one line per class (printed at run start)."""
        mark = {k: " (default: no spec gave it)" if k in self.defaulted else "" for k in self.SPEC_KEYS}
        lines = [
            f"task {self.name}: {self.num_classes} classes, template {self.template!r}{mark['template']}, "
            f"encoder template {self.encoder_template!r}",
            f"  class -> label word{mark['label_words']} | description{mark['label_descriptions']}",
        ]
        for label, word, desc in zip(self.labels, self.label_words, self.label_descriptions):
            lines.append(f"  {label} -> {word!r} | {desc!r}")
        if self.causal_template:
            words = ", ".join(repr(w) for w in self.causal_label_words or self.label_words)
            lines.append(f"  causal LMs read {self.causal_template!r} with label words {words}")
        return "\n".join(lines)

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
