"""Turning an OpenAI-compatible endpoint's answers into class scores: :class:`TextBatch` (a split phrased as
text), the three scoring modes (:class:`Scorer`, mixed into :class:`~bbfl.blackbox.openai.OpenAIBlackBox`) and
the helpers that read cleaned responses. Requests go through :mod:`bbfl.blackbox.openai.transport`.

* ``scoring="chat"``: one chat completion per (prompt, example), ``max_tokens=1``, ``logprobs`` with
  ``top_logprobs=k``. A class's probability is the summed probability of the top-k tokens that
  equal its label word (case and surrounding space ignored); a label word absent from the top k
  gets the floor :data:`LABEL_FLOOR` = 0.01, as FedOne does (Wang et al., ICML 2025,
  https://arxiv.org/abs/2506.14929). Scores are log-probabilities.
* ``scoring="completions"``: exact label log-likelihoods from the legacy completions endpoint with
  ``echo=True, max_tokens=0, logprobs=0``. The example is the template cut at ``{mask}``; for each class the
  text ``prefix + " " + label word`` is sent and the class score is the sum of the echoed ``token_logprobs``
  of the tokens at or after ``len(prefix)`` (``text_offset``): log p(label word | prefix). No floor, no
  top-k. Up to ``echo_batch`` texts go in one request.
* ``scoring="embeddings"``: ``scale * cosine(embed(prompt + text), embed(label description))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from bbfl.blackbox.openai.responses import MalformedResponse
from bbfl.blackbox.openai.transport import UnsupportedEndpoint
from bbfl.exceptions import ConfigError, EndpointError

if TYPE_CHECKING:
    from bbfl.data import Split, Task

Scoring = Literal["auto", "chat", "completions", "embeddings"]
LABEL_FLOOR = 0.01  # FedOne: probability of a label word missing from top_logprobs

__all__ = ["LABEL_FLOOR", "Scorer", "Scoring", "TextBatch"]


@dataclass
class TextBatch:
    """A split phrased for a text API: one string per example (the template filled), labels kept locally."""

    texts: list[str]
    labels: torch.Tensor
    label_words: list[str]
    label_descriptions: list[str]

    def __len__(self) -> int:
        return len(self.texts)


class Scorer:
    """The three scorings (mixed into :class:`~bbfl.blackbox.openai.OpenAIBlackBox`): :meth:`encode`,
    :meth:`logits`, :meth:`embed`, :meth:`echo`. Sends through the
    :class:`~bbfl.blackbox.openai.transport.Transport` it is mixed with (``_map``, ``_per_text``, ``counter``,
    ``costs``, ``_where``) and reads the settings the black box sets (``scoring``, ``top_logprobs``, ...)."""

    model: str
    scoring: str
    top_logprobs: int
    label_floor: float
    mask_text: str
    instruction: str
    similarity_scale: float
    embed_batch: int
    echo_batch: int
    _label_cache: dict[tuple[str, ...], torch.Tensor]

    # ------------------------------------------------------------------ data
    def encode(self, task: Task, split: Split) -> TextBatch:
        """Phrase each example once: the task template (chat), the template up to its ``{mask}`` (completions:
        the label word follows), or the encoder template (embeddings)."""
        if self.scoring == "completions":
            task = task.for_head("causal")  # a completions endpoint is a causal LM: read as the local causal head
        if self.scoring == "chat":
            texts = task.format(split, self.mask_text)
        elif self.scoring == "completions":
            texts = task.format_before_mask(split)
        else:
            texts = task.format_for_encoder(split)
        labels = torch.as_tensor(np.asarray(split.labels), dtype=torch.long)
        return TextBatch(texts, labels, list(task.label_words), list(task.label_descriptions))

    # ------------------------------------------------------------------ scoring
    def logits(self, prompts: list[str] | None, data: TextBatch) -> torch.Tensor:
        """[P, B, C] class scores of P discrete prompts (``None`` = no prompt) on ``data``. Counts P queries."""
        prompts = [""] if prompts is None else list(prompts)
        n_cand = len(prompts)
        inputs = [p + t for p in prompts for t in data.texts]
        if self.scoring == "completions":  # before the budget is charged: a text with no context costs nothing
            labelled = [_with_label(text, word) for text in inputs for word in data.label_words]
        with self.counter.charge(queries=n_cand, examples=n_cand * len(data), tokens=0):
            tokens_before = self.costs.prompt_tokens + self.costs.completion_tokens
            if self.scoring == "chat":
                scores = self._chat_scores(inputs, data.label_words)
            elif self.scoring == "completions":
                scores = self._completion_scores(labelled).view(len(inputs), len(data.label_words))
            else:
                scores = self._embedding_scores(inputs, data.label_descriptions)
            self.counter.stats.tokens += self.costs.prompt_tokens + self.costs.completion_tokens - tokens_before
            _require_finite(scores, self._where)
        return scores.view(n_cand, len(data), -1)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """[N, H] unit-norm embeddings, cached per text: only unseen texts are sent (``embed_batch`` per request)."""
        rows = self._per_text("embeddings", texts, self.embed_batch, self._embeddings_request, self._embedding_rows)
        if len({len(row["embedding"]) for row in rows}) > 1:
            raise MalformedResponse(f"{self._where} gave embeddings of different sizes for one batch of texts")
        if not rows:
            return torch.zeros(0, 0)
        out = torch.tensor([row["embedding"] for row in rows], dtype=torch.float64)
        # scaled by the largest entry first: any finite vector normalises without overflow (1e200 squared does)
        out = out / out.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        return torch.nn.functional.normalize(out, dim=-1).float()

    def _embeddings_request(self, texts: list[str]) -> dict:
        return {"model": self.model, "input": texts, "encoding_format": "float"}

    def _embedding_rows(self, resp: dict, texts: list[str]) -> list[dict]:
        rows = resp["data"]  # cleaned: in index order, finite
        if len(rows) != len(texts):
            raise MalformedResponse(f"{self._where} returned {len(rows)} embeddings for {len(texts)} inputs")
        return [{"embedding": row["embedding"]} for row in rows]

    def echo(self, texts: list[str]) -> list[dict]:
        """Per text, its echoed ``token_logprobs`` and ``text_offset`` (completions with ``echo=True,
        max_tokens=0``), cached per text: only unseen texts are sent, ``echo_batch`` per request."""
        return self._per_text("completions", texts, self.echo_batch, self._echo_request, self._echo_rows)

    def _echo_request(self, texts: list[str]) -> dict:
        return {"model": self.model, "prompt": texts, "echo": True, "max_tokens": 0, "logprobs": 0, "temperature": 0}

    def _echo_rows(self, resp: dict, texts: list[str]) -> list[dict]:
        return _echo_rows(resp, texts, self._where)

    def _completion_scores(self, labelled: list[tuple[str, int]]) -> torch.Tensor:
        """[N] log p(label word | prefix): each text's echoed log-probabilities from the label word's start on."""
        rows = self.echo([text for text, _ in labelled])
        scores = [self._label_logprob(row, text, start) for row, (text, start) in zip(rows, labelled)]
        return torch.tensor(scores, dtype=torch.float32)

    def _label_logprob(self, row: dict, text: str, start: int) -> float:
        # tokens starting before len(text) only: a server that generates despite max_tokens=0 adds none
        picked = [lp for lp, at in zip(row["token_logprobs"], row["text_offset"]) if start <= at < len(text)]
        if not picked:
            raise MalformedResponse(f"{self._where} echoed no token starting in the label word of {text[-60:]!r}")
        if any(lp is None for lp in picked):
            raise MalformedResponse(
                f"{self._where} gave the label word's first token no log-probability (it is the model's first "
                f"token: nothing precedes it) in {text[-60:]!r}"
            )
        return float(sum(picked))

    def _embedding_scores(self, inputs: list[str], descriptions: list[str]) -> torch.Tensor:
        key = tuple(descriptions)
        if key not in self._label_cache:
            self._label_cache[key] = self.embed(descriptions)
        texts, labels = self.embed(inputs), self._label_cache[key]
        if texts.shape[-1] != labels.shape[-1]:
            raise MalformedResponse(
                f"{self._where} gave {texts.shape[-1]}-d embeddings for the texts but {labels.shape[-1]}-d ones for "
                "the label descriptions"
            )
        return self.similarity_scale * texts @ labels.T

    def _chat_scores(self, inputs: list[str], label_words: list[str]) -> torch.Tensor:
        requests = [self._chat_request(text + self.instruction, self.top_logprobs) for text in inputs]
        words = [_norm(w) for w in label_words]
        rows = []
        for resp in self._map("chat", requests):
            top = _top_logprobs(resp)
            if not top:
                raise UnsupportedEndpoint(
                    f"{self._where} answered a chat completion without logprobs; scoring='chat' needs them"
                )
            probs = [0.0] * len(words)
            for token, logprob in top:
                t = _norm(token)
                for c, w in enumerate(words):
                    if t == w:
                        probs[c] += math.exp(logprob)
            # at most 1: the server's rounding may leave a word's summed probability a hair above (responses.py)
            rows.append([math.log(min(max(p, self.label_floor), 1.0)) for p in probs])
        return torch.tensor(rows, dtype=torch.float32)

    def _chat_request(self, text: str, k: int) -> dict:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": k,
        }


def _require_finite(scores: torch.Tensor, where: str) -> None:
    """The last guard: a score built from finite parts can still overflow (a sum of huge log-probabilities)."""
    if not torch.isfinite(scores).all():
        raise EndpointError(f"{where}: the answers gave non-finite class scores (log-probabilities too large in size)")


def _top_logprobs(resp: dict) -> list[tuple[str, float]]:
    """(token, logprob) pairs of the first generated token's top alternatives from a cleaned chat response;
    [] if the endpoint gave none."""
    logprobs = resp["choices"][0]["logprobs"]
    if not logprobs:
        return []
    return [(t["token"], t["logprob"]) for t in logprobs["content"][0]["top_logprobs"]]


def _with_label(prefix: str, word: str) -> tuple[str, int]:
    """``prefix + " " + word`` and where the label word starts. One space, as a model continues a text with
    a new word (the `` great`` token chat scoring reads); the prefix's own trailing space is dropped so that
    the space-carrying label token starts at ``len(prefix)`` and is counted."""
    head = prefix.rstrip()
    if not head:
        raise ConfigError(
            "scoring='completions' scores log p(label word | the text before it), but an example has no text "
            "before the label word (a template starting with {mask} and no prompt): give a prompt"
        )
    return f"{head} {word.strip()}", len(head)


def _echo_rows(resp: dict, texts: list[str], where: str) -> list[dict]:
    """Per text (in request order), the echoed ``token_logprobs`` and ``text_offset`` of a cleaned completions
    response; ``UnsupportedEndpoint`` if the endpoint answered without echoing the prompt's tokens."""
    choices = resp["choices"]
    if len(choices) != len(texts):
        raise MalformedResponse(f"{where} returned {len(choices)} completions for {len(texts)} prompts")
    rows = []
    for text, choice in zip(texts, choices):
        logprobs = choice["logprobs"] or {}
        values, offsets = logprobs.get("token_logprobs") or [], logprobs.get("text_offset") or []
        # an echo starts inside the prompt; a plain completion's first token starts after it (llama-server)
        if not offsets or offsets[0] >= len(text) or len(values) != len(offsets):
            raise UnsupportedEndpoint(
                f"{where} answered a completion without echoing the prompt's token log-probabilities; "
                "scoring='completions' needs echo=True with max_tokens=0 (e.g. vLLM, OpenAI legacy models)"
            )
        rows.append({"token_logprobs": list(values), "text_offset": list(offsets)})
    return rows


def _norm(token: str) -> str:
    return token.replace("Ġ", " ").replace("▁", " ").strip().lower()
