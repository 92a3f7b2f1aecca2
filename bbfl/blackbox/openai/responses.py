"""What an OpenAI-compatible endpoint answered, checked before anything is scored or cached.

Each ``clean_*`` function takes a parsed 2xx body (or a cache entry) and returns a minimal dict of the same
OpenAI shape holding only what scoring reads, every number checked: log-probabilities finite and at most 0,
embeddings finite, indices a permutation, offsets non-negative integers. Anything else is a
:class:`MalformedResponse` naming the field and the value. Cleaning is idempotent, so cache entries (written
clean, or by an older bbfl as a full response) pass through the same check when read back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from bbfl.exceptions import EndpointError

# a log-probability a hair above 0 is float rounding on the server; above this it is not a log-probability
LOGPROB_TOLERANCE = 1e-4
# top_logprobs are distinct tokens: their probabilities sum to at most 1; this much slack for servers that round
# log-probabilities (to 2 decimals: up to 0.5% per token)
PROBABILITY_SLACK = 1e-2
SNIPPET = 80  # characters of an unreadable body quoted in an error


class MalformedResponse(EndpointError):
    """A 2xx answer that cannot be read as the route's response (names the field and the value)."""


def parse_body(content: bytes, where: str, redact: Callable[[str], str] = str) -> dict[str, Any]:
    """The JSON object of a response body; strict: no NaN / Infinity constants, no non-object top level."""
    if not content.strip():
        raise MalformedResponse(f"{where} answered with an empty body; expected a JSON object")
    try:
        body = json.loads(content.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        snippet = redact(content[:SNIPPET].decode("utf-8", "replace"))
        raise MalformedResponse(f"{where} answered a body that is not JSON ({exc}): {snippet!r}") from None
    if not isinstance(body, dict):
        raise MalformedResponse(f"{where} answered a JSON {type(body).__name__}; expected a JSON object")
    if "error" in body and body["error"] is not None:  # some proxies report failures with a 200
        raise EndpointError(f"{where} answered an error with a success status: {redact(str(body['error'])[:200])}")
    return body


def loads_cache(text: str) -> Any:
    """A cache file's JSON, with the same strictness as a response body."""
    return json.loads(text, parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"non-standard JSON constant {name}")


def usage_tokens(body: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens from ``usage``; a missing or unreadable count is 0 (it costs, never scores)."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return 0, 0
    return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53 else 0


# ---------------------------------------------------------------------------------------------- numbers
def logprob(value: Any, field: str, *, nullable: bool = False) -> float | None:
    """A log-probability: a finite number <= 0 (``None`` where ``nullable``: an echoed first token has none)."""
    if value is None and nullable:
        return None
    number = _finite(value)
    if number is None:
        raise MalformedResponse(f"{field} must be a finite number <= 0 (a log-probability), got {value!r}")
    if number > LOGPROB_TOLERANCE:
        raise MalformedResponse(
            f"{field} must be <= 0 (a log-probability), got {value!r}: a probability of {_prob(value)} is above 1"
        )
    return min(number, 0.0)


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (not a number, a bool, NaN, infinite, or an int beyond float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _prob(value: float) -> str:
    return f"e^{value:g}" if value > 700 else f"{math.exp(value):.4g}"


def _index(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedResponse(f"{field} must be a non-negative integer, got {value!r}")
    return value


def _list(value: Any, field: str) -> list:
    if not isinstance(value, list):
        raise MalformedResponse(f"{field} must be a list, got {_kind(value)}")
    return value


def _object(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise MalformedResponse(f"{field} must be an object, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"


def _ordered(items: list, field: str) -> list[dict]:
    """``items`` (objects with ``index``) in index order; the indices must be 0..n-1, each once."""
    objects = [_object(item, f"{field}[{i}]") for i, item in enumerate(items)]
    indices = [_index(obj.get("index", i), f"{field}[{i}].index") for i, obj in enumerate(objects)]
    if sorted(indices) != list(range(len(objects))):
        raise MalformedResponse(f"{field} indices must be 0..{len(objects) - 1} once each, got {indices}")
    return [obj for _, obj in sorted(zip(indices, objects), key=lambda pair: pair[0])]


# ---------------------------------------------------------------------------------------------- routes
def clean_chat(body: dict[str, Any], where: str) -> dict[str, Any]:
    """The first generated token's top alternatives, validated; ``logprobs: null`` kept when the endpoint gave none."""
    choices = _list(body.get("choices"), f"{where}: choices")
    if not choices:
        raise MalformedResponse(f"{where}: choices is empty; expected one completion")
    choice = _object(choices[0], f"{where}: choices[0]")
    pairs = _chat_pairs(choice.get("logprobs"), f"{where}: choices[0].logprobs")
    if not pairs:
        return {"choices": [{"index": 0, "logprobs": None}]}
    top = [{"token": token, "logprob": lp} for token, lp in pairs]
    return {"choices": [{"index": 0, "logprobs": {"content": [{**top[0], "top_logprobs": top}]}}]}


def _chat_pairs(logprobs: Any, field: str) -> list[tuple[str, float]]:
    if logprobs is None:
        return []
    content = _object(logprobs, field).get("content")
    if content is None or content == []:
        return []
    first = _object(_list(content, f"{field}.content")[0], f"{field}.content[0]")
    entries = first.get("top_logprobs") or [first]
    pairs = []
    for i, entry in enumerate(_list(entries, f"{field}.content[0].top_logprobs")):
        entry = _object(entry, f"{field}.content[0].top_logprobs[{i}]")
        token = entry.get("token")
        if not isinstance(token, str):
            raise MalformedResponse(f"{field}.content[0].top_logprobs[{i}].token must be a string, got {_kind(token)}")
        pairs.append((token, logprob(entry.get("logprob"), f"{field}.content[0].top_logprobs[{i}].logprob")))
    total = sum(math.exp(lp) for _, lp in pairs)
    if total > 1 + PROBABILITY_SLACK:
        raise MalformedResponse(f"{field}: the top_logprobs' probabilities sum to {total:.4g}, more than 1")
    return pairs


def clean_completions(body: dict[str, Any], where: str) -> dict[str, Any]:
    """Per completion (index order), its ``token_logprobs`` (finite <= 0, or null) and ``text_offset``."""
    field = f"{where}: choices"
    choices = _ordered(_list(body.get("choices"), field), field)
    return {
        "choices": [
            {"index": i, "logprobs": _echo_logprobs(c.get("logprobs"), f"{field}[{i}].logprobs")}
            for i, c in enumerate(choices)
        ]
    }


def _echo_logprobs(logprobs: Any, field: str) -> dict[str, list] | None:
    if logprobs is None:
        return None
    logprobs = _object(logprobs, field)
    values = _list(logprobs.get("token_logprobs") or [], f"{field}.token_logprobs")
    offsets = _list(logprobs.get("text_offset") or [], f"{field}.text_offset")
    return {
        "token_logprobs": [logprob(v, f"{field}.token_logprobs[{i}]", nullable=True) for i, v in enumerate(values)],
        "text_offset": [_index(o, f"{field}.text_offset[{i}]") for i, o in enumerate(offsets)],
    }


def clean_embeddings(body: dict[str, Any], where: str) -> dict[str, Any]:
    """Embeddings in index order, each a non-empty list of finite numbers, all of one dimension."""
    rows = _ordered(_list(body.get("data"), f"{where}: data"), f"{where}: data")
    vectors = [embedding(row.get("embedding"), f"{where}: data[{i}].embedding") for i, row in enumerate(rows)]
    if len({len(v) for v in vectors}) > 1:
        raise MalformedResponse(f"{where}: embeddings of different sizes {sorted({len(v) for v in vectors})}")
    return {"data": [{"index": i, "embedding": v} for i, v in enumerate(vectors)]}


def embedding(value: Any, field: str) -> list[float]:
    """A non-empty list of finite numbers (an embedding)."""
    values = _list(value, field)
    if not values:
        raise MalformedResponse(f"{field} is empty; expected a vector")
    floats = [_finite(v) for v in values]
    if None in floats:
        raise MalformedResponse(f"{field} must hold finite numbers only, got {values[floats.index(None)]!r}")
    return floats  # type: ignore[return-value]


CLEAN = {"chat": clean_chat, "completions": clean_completions, "embeddings": clean_embeddings}


def clean_row(route: str, row: Any, where: str) -> dict[str, Any]:
    """A per-text cache entry: ``{"embedding": [...]}`` or ``{"token_logprobs": [...], "text_offset": [...]}``."""
    row = _object(row, where)
    if route == "embeddings":
        return {"embedding": embedding(row.get("embedding"), f"{where}.embedding")}
    echo = _echo_logprobs(row, where)
    if echo is None or len(echo["token_logprobs"]) != len(echo["text_offset"]) or not echo["text_offset"]:
        raise MalformedResponse(f"{where}: an echo row needs token_logprobs and text_offset of one length")
    return echo
