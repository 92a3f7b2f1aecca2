"""Checks on the JSON header beside a client's arrays: required keys, types, finite values, ranges.

:func:`bbfl.federation.wire.validate_update` checks a client's arrays; this module does the same for
its header, before :meth:`FederatedMethod.aggregate` reads it. Each federated method declares what
its update header holds with ``header_spec(client)`` (a dict of field name -> :class:`Field`); the
engine calls :func:`validate_header` with it, so a bad header is a logged ``InvalidUpdate``
rejection and the round goes on, like a bad array.

Bounds that depend on what the server knows (a client's data size, the step size it sent) are
computed by the method when it builds the spec.

>>> spec = {"examples": count(1, 50), "loss": number()}
>>> validate_header({"examples": 7, "loss": 0.5}, spec)
>>> validate_header({"examples": 1e300, "loss": 0.5}, spec)
Traceback (most recent call last):
...
bbfl.federation.wire.InvalidUpdate: header field 'examples' should be an integer, got float 1e+300
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bbfl.federation.wire import InvalidUpdate

# a query count or an example count beyond this is never honest (and would break float64 sums)
MAX_COUNT = 2**53


@dataclass(frozen=True)
class Field:
    """One header field: an ``int`` or ``float`` scalar, a list of them (``length`` = (min, max) items),
    or a ``str`` of ``length`` characters (its content is the method's to parse).

    ``low``/``high`` bound the value (each item of a list), both inclusive; ``positive`` excludes 0.
    """

    kind: str  # "int", "float" or "str" (a string whose length is in ``length``)
    low: float | None = None
    high: float | None = None
    length: tuple[int, int] | None = None  # a list of `kind` with this many items
    positive: bool = False


def count(low: int = 0, high: int = MAX_COUNT) -> Field:
    """An integer in [low, high] (examples, queries, a seed)."""
    return Field("int", low, high)


def number(low: float | None = None, high: float | None = None, positive: bool = False) -> Field:
    """A finite real in [low, high] (``positive``: > 0)."""
    return Field("float", low, high, positive=positive)


def int_list(min_len: int, max_len: int, low: int = 0, high: int = MAX_COUNT) -> Field:
    """A list of ``min_len``..``max_len`` integers, each in [low, high]."""
    return Field("int", low, high, length=(min_len, max_len))


def number_list(min_len: int, max_len: int, low: float | None = None, high: float | None = None, positive=False):
    """A list of ``min_len``..``max_len`` finite reals, each in [low, high]."""
    return Field("float", low, high, length=(min_len, max_len), positive=positive)


def text(min_len: int, max_len: int) -> Field:
    """A string of ``min_len``..``max_len`` characters (e.g. FedBPT's replay ranks)."""
    return Field("str", length=(min_len, max_len))


def validate_header(header: Any, spec: Mapping[str, Field]) -> None:
    """Raise :class:`InvalidUpdate` unless ``header`` holds exactly the fields of ``spec``, each valid."""
    if not isinstance(header, dict):
        raise InvalidUpdate(f"update header should be a JSON object, got {type(header).__name__}")
    missing = sorted(set(spec) - set(header))
    if missing:
        raise InvalidUpdate(f"update header lacks field(s) {missing}; expected {sorted(spec)}")
    unexpected = sorted(set(header) - set(spec), key=str)
    if unexpected:
        raise InvalidUpdate(f"unexpected update header field(s) {unexpected[:5]}; expected {sorted(spec)}")
    for name, field in spec.items():
        _check_field(name, header[name], field)


def _check_field(name: str, value: Any, field: Field) -> None:
    if field.kind == "str":
        lo, hi = field.length or (0, MAX_COUNT)
        if not isinstance(value, str):
            raise InvalidUpdate(f"header field {name!r} should be a string, got {type(value).__name__} {_short(value)}")
        if not lo <= len(value) <= hi:
            raise InvalidUpdate(f"header field {name!r} has {len(value)} characters, expected {lo}..{hi}")
        return
    if field.length is None:
        _check_scalar(f"header field {name!r}", value, field)
        return
    lo, hi = field.length
    if not isinstance(value, list):
        raise InvalidUpdate(f"header field {name!r} should be a list, got {type(value).__name__}")
    if not lo <= len(value) <= hi:
        raise InvalidUpdate(f"header field {name!r} has {len(value)} items, expected {lo}..{hi}")
    for i, item in enumerate(value):
        _check_scalar(f"header field {name!r}[{i}]", item, field)


def _check_scalar(what: str, value: Any, field: Field) -> None:
    # bool is an int subclass in Python: `true` is never a count or a loss
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidUpdate(f"{what} should be a number, got {type(value).__name__} {_short(value)}")
    if field.kind == "int" and not isinstance(value, int):
        raise InvalidUpdate(f"{what} should be an integer, got float {_short(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidUpdate(f"{what} is {value}, expected a finite number")
    if field.low is not None and value < field.low:
        raise InvalidUpdate(f"{what} is {_short(value)}, expected >= {field.low:g}")
    if field.high is not None and value > field.high:
        raise InvalidUpdate(f"{what} is {_short(value)}, expected <= {field.high:g}")
    if field.positive and value <= 0:
        raise InvalidUpdate(f"{what} is {_short(value)}, expected > 0")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
