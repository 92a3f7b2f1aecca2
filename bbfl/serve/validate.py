"""Request validation for ``bbfl serve``: every value that comes over the network is checked here.

Each check raises :class:`APIError` (a 4xx with an OpenAI-style JSON body) naming the field, what it
got and what was expected, before the value can reach the tokenizer, the model or the encoding cache.
Nothing here touches the model: the functions are pure, so a fuzzer can drive them cheaply.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bbfl.blackbox.remote import TASK_FIELDS

if TYPE_CHECKING:
    from bbfl.data import Split, Task

# dtypes a soft prompt may travel in: real floating point with a finite check torch implements
PROMPT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class APIError(Exception):
    """An HTTP error with an OpenAI-style JSON body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


@dataclass(frozen=True)
class Perturb:
    """FedBPT's perturbed-data request: ``rate`` of the tokens replaced, drawn from ``seed``."""

    rate: float
    seed: int


def parse_json(body: bytes) -> dict:
    """A JSON object from a request body; anything else (bad JSON, too deeply nested, not an object) is a 400."""
    try:
        payload = json.loads(body)
    except RecursionError as exc:  # e.g. 100k nested `[`: the C decoder recurses per level
        raise APIError(400, "body is not JSON we accept: nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise APIError(400, f"body is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise APIError(400, f"body must be a JSON object, got {type(payload).__name__}")
    return payload


def text(value: Any, name: str) -> str:
    """A string that is valid Unicode (a lone surrogate from a ``\\ud800`` escape would crash the tokenizer)."""
    if not isinstance(value, str):
        raise APIError(422, f"{name} must be a string, got {_kind(value)}", name)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise APIError(422, f"{name} is not valid Unicode: lone surrogate at character {exc.start}", name) from exc
    return value


def texts(value: Any, name: str, allow_single: bool = True) -> list[str]:
    """A list of strings (or one string when ``allow_single``), each valid Unicode."""
    if allow_single and isinstance(value, str):
        return [text(value, name)]
    if not isinstance(value, list):
        what = "a string or a list of strings" if allow_single else "a list of strings"
        raise APIError(422, f"{name} must be {what} (token arrays are not supported), got {_kind(value)}", name)
    return [text(v, f"{name}[{i}]") for i, v in enumerate(value)]


def integer(value: Any, name: str, lo: int, hi: int, default: int | None = None) -> int:
    """An integer in ``[lo, hi]`` (``None`` gives ``default`` when there is one); ``true`` is not an integer."""
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise APIError(422, f"{name} must be an integer in [{lo}, {hi}], got {shown(value)}", name)
    return value


def flag(value: Any, name: str) -> bool:
    """An optional boolean (``null`` / absent is false)."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(422, f"{name} must be true or false, got {shown(value)}", name)
    return value


def count(name: str, value: int, limit: int, allow_zero: bool = False) -> None:
    if value > limit:
        raise APIError(422, f"{name}: {value} items in one request > limit {limit}; split the request", name)
    if value == 0 and not allow_zero:
        raise APIError(422, f"{name}: empty", name)


def message_text(message: Any, index: int) -> str:
    """A chat message's text: a string ``content`` or a list of ``{"type": "text", "text": str}`` parts."""
    name = f"messages[{index}].content"
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return text(content, name)
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "".join(text(p.get("text"), f"{name}[].text") for p in parts)
    raise APIError(422, f"{name} must be a string or a list of text parts, got {_kind(content)}", "messages")


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def message_role(message: Any, index: int) -> str:
    """A chat message's ``role``: one of OpenAI's roles (a chat template reads it)."""
    role = message.get("role") if isinstance(message, dict) else None
    if role not in CHAT_ROLES:
        shown = role if isinstance(role, str) and len(role) <= 40 else _kind(role)
        raise APIError(422, f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, got {shown!r}", "messages")
    return role


def prompts_tensor(tensors: dict[str, torch.Tensor], hidden_size: int) -> torch.Tensor:
    """The soft prompts of a scores request: real floating point, ``[P, L, H]`` or ``[K, B, L, H]``, finite."""
    prompts = tensors.get("prompts")
    if prompts is None or prompts.dim() not in (3, 4):
        shape = None if prompts is None else list(prompts.shape)
        raise APIError(422, f"need a tensor `prompts` of shape [P, L, H] or [K, B, L, H], got {shape}", "prompts")
    if prompts.dtype not in PROMPT_DTYPES:  # float8 has no finite check; complex would lose its imaginary part
        allowed = ", ".join(str(d).removeprefix("torch.") for d in PROMPT_DTYPES)
        raise APIError(422, f"prompts dtype {str(prompts.dtype).removeprefix('torch.')}; expected {allowed}", "prompts")
    if prompts.shape[-1] != hidden_size:
        raise APIError(422, f"prompt hidden size {prompts.shape[-1]} != the model's {hidden_size}", "prompts")
    if not torch.isfinite(prompts).all():
        raise APIError(422, "prompts hold NaN or Inf", "prompts")
    return prompts


def request_meta(meta: Any) -> dict:
    if not isinstance(meta, dict):
        raise APIError(422, f"metadata `bbfl` must be a JSON object, got {_kind(meta)}", "bbfl")
    return meta


def task_and_split(meta: dict, max_classes: int) -> tuple[Task, Split]:
    """The task (phrasing only: no data) and the texts of a scores / features request."""
    from bbfl.data import Split, Task

    spec = meta.get("task")
    if not isinstance(spec, dict) or any(f not in spec for f in TASK_FIELDS):
        raise APIError(422, f"metadata `bbfl.task` must be an object holding {list(TASK_FIELDS)}", "task")
    strings = {f: text(spec[f], f"task.{f}") for f in ("name", "template", "encoder_template")}
    for f, needed in (("template", ("{text}", "{mask}")), ("encoder_template", ("{text}",))):  # as data specs
        if not all(n in strings[f] for n in needed):
            raise APIError(422, f"task.{f} must contain {' and '.join(needed)}, got {shown(strings[f])}", f)
    labels = texts(spec["labels"], "task.labels", allow_single=False)
    if not 2 <= len(labels) <= max_classes:
        expected = f"expected 2 to {max_classes} (--max-classes)"
        raise APIError(422, f"task.labels: {len(labels)} classes; {expected}", "labels")
    lists = {"labels": labels}
    for f in ("label_words", "label_descriptions"):  # one per class: the head reads one or the other
        lists[f] = texts(spec[f], f"task.{f}", allow_single=False)
        if len(lists[f]) != len(labels):
            raise APIError(422, f"task.{f}: {len(lists[f])} entries for {len(labels)} labels; need one per label", f)
    split_texts = texts(meta.get("texts"), "texts", allow_single=False)
    pairs = meta.get("text_pairs")
    if pairs is not None:
        pairs = texts(pairs, "text_pairs", allow_single=False)
        if len(pairs) != len(split_texts):
            got = f"{len(pairs)} for {len(split_texts)} texts"
            raise APIError(422, f"text_pairs: {got}; need one per text", "text_pairs")
    task = Task(**strings, **lists, loss="ce", train=Split([], np.zeros(0)))
    return task, Split(split_texts, np.zeros(len(split_texts), dtype=np.int64), pairs)


def perturb(value: Any) -> Perturb | None:
    """``null`` or ``{"rate": number in [0, 1], "seed": integer}`` (what FedBPT's perturbed fitness sends)."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"rate", "seed"}:
        got = sorted(value) if isinstance(value, dict) else _kind(value)
        raise APIError(422, f"perturb must be null or {{'rate': 0..1, 'seed': integer}}, got {got}", "perturb")
    rate = value["rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (math.isfinite(rate) and 0 <= rate <= 1):
        raise APIError(422, f"perturb.rate must be a number in [0, 1], got {shown(rate)}", "perturb")
    return Perturb(float(rate), integer(value["seed"], "perturb.seed", *SEED_RANGE))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def shown(value: Any) -> str:
    """A value for an error message, cut short: the message must not echo a whole hostile payload."""
    shown = repr(value)
    return shown if len(shown) <= 60 else f"{shown[:57]}..."
