"""What crosses between client and server: named float arrays plus a small JSON header, as safetensors bytes.

Never pickle: a message is parsed by ``safetensors`` (a length-prefixed JSON header and raw
little-endian buffers), so bytes from the network cannot run code. :func:`validate_update` then
checks shapes, finiteness and norms before an update may touch the global state.

>>> import numpy as np
>>> blob = encode_message({"mean": np.zeros(3, np.float32)}, {"client": 2})
>>> arrays, header = decode_message(blob)
>>> header["client"], arrays["mean"].shape
(2, (3,))
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from bbfl.exceptions import BBFLError

HEADER_KEY = "bbfl"
WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}
_SAFETENSORS_DTYPES = {"F32", "F16"}  # what encode_message writes; anything else is refused, never cast

# Stated limits, checked on the raw bytes before anything big is parsed or allocated.
MAX_MESSAGE_BYTES = 1 << 30  # 1 GiB: a dense FwdLLM gradient of a large adapter still fits
MAX_HEADER_BYTES = 1 << 20  # 1 MiB of safetensors JSON header (bbfl's own headers are < 4 KiB)
MAX_TENSORS = 4096  # named arrays in one message


class InvalidUpdate(BBFLError, ValueError):
    """A client message failed validation; ``reason`` says why (it is logged, the round goes on)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_message(
    arrays: Mapping[str, np.ndarray], header: Mapping[str, Any] | None = None, dtype: str = "float32"
) -> bytes:
    """Serialise arrays (cast to the transport ``dtype``) and a JSON-able header."""
    from safetensors.numpy import save

    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown transport dtype {dtype!r}; expected one of {sorted(WIRE_DTYPES)}")
    cast = {k: np.ascontiguousarray(np.asarray(v), dtype=WIRE_DTYPES[dtype]) for k, v in arrays.items()}
    return save(cast, metadata={HEADER_KEY: json.dumps(dict(header or {}))})


def decode_message(
    blob: bytes, max_bytes: int = MAX_MESSAGE_BYTES, max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Parse bytes from :func:`encode_message`; arrays come back as float32. Bad bytes -> InvalidUpdate.

    Only float32/float16 arrays are accepted (complex, integer or bool arrays are refused, not cast);
    the message size, the header size and the number of arrays are checked before the arrays are read.
    """
    from safetensors.numpy import load

    table = _read_table(blob, max_bytes, max_header_bytes)
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in _SAFETENSORS_DTYPES:
            raise InvalidUpdate(
                f"array {name[:80]!r} has dtype {dtype!r}; expected one of {sorted(_SAFETENSORS_DTYPES)}"
            )
    metadata = table.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise InvalidUpdate(f"message metadata should be a JSON object, got {type(metadata).__name__}")
    try:
        arrays = load(bytes(blob))
        header = parse_header_json(metadata.get(HEADER_KEY, "{}"))
    except Exception as exc:  # safetensors raises several types for corrupt input; json a RecursionError
        raise InvalidUpdate(f"undecodable message ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(header, dict):
        raise InvalidUpdate(f"message header should be a JSON object, got {type(header).__name__}")
    return {k: v.astype(np.float32) for k, v in arrays.items()}, header


def parse_header_json(text: str | bytes) -> Any:
    """Strict JSON: ``NaN``/``Infinity`` (which Python's json accepts) and overflowing numbers such as
    ``1e999`` are refused, so no non-finite value reaches a state."""
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in a header")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} overflows a float")
    return value


def _read_table(blob: bytes, max_bytes: int, max_header_bytes: int) -> dict[str, Any]:
    """The safetensors JSON table (8-byte little-endian length, then JSON), size-checked first."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise InvalidUpdate(f"undecodable message: should be bytes, got {type(blob).__name__}")
    if len(blob) > max_bytes:
        raise InvalidUpdate(f"undecodable message: {len(blob):,} bytes exceeds the limit of {max_bytes:,}")
    if len(blob) < 8:
        raise InvalidUpdate(f"undecodable message: {len(blob)} bytes is too short for a safetensors header")
    size = int.from_bytes(bytes(blob[:8]), "little")
    if size > max_header_bytes:
        raise InvalidUpdate(f"undecodable message: header of {size:,} bytes exceeds the limit of {max_header_bytes:,}")
    if 8 + size > len(blob):
        raise InvalidUpdate(f"undecodable message: header declares {size:,} bytes but only {len(blob) - 8:,} follow")
    try:
        table = json.loads(bytes(blob[8 : 8 + size]))
    except Exception as exc:  # ValueError, UnicodeDecodeError, RecursionError on deep nesting
        raise InvalidUpdate(f"undecodable message: header is not JSON ({type(exc).__name__})") from exc
    if not isinstance(table, dict):
        raise InvalidUpdate(f"undecodable message: header should be a JSON object, got {type(table).__name__}")
    tensors = len(table) - ("__metadata__" in table)
    if tensors > MAX_TENSORS:
        raise InvalidUpdate(f"undecodable message: declares {tensors:,} arrays, more than the limit of {MAX_TENSORS:,}")
    return table


def validate_update(
    arrays: Mapping[str, np.ndarray], expected_shapes: Mapping[str, tuple[int, ...]], max_norm: float | None = None
) -> None:
    """Raise :class:`InvalidUpdate` unless every expected array is present, shaped right, finite and not absurd."""
    missing = sorted(set(expected_shapes) - set(arrays))
    if missing:
        raise InvalidUpdate(f"missing array(s) {missing}")
    unexpected = sorted(set(arrays) - set(expected_shapes))
    if unexpected:
        raise InvalidUpdate(f"unexpected array(s) {unexpected}")
    for name, shape in expected_shapes.items():
        value = arrays[name]
        if tuple(value.shape) != tuple(shape):
            raise InvalidUpdate(f"{name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        if not np.all(np.isfinite(value)):
            raise InvalidUpdate(f"{name!r} contains NaN or Inf")
        norm = float(np.linalg.norm(value.astype(np.float64)))  # float32 squares overflow
        if max_norm is not None and norm > max_norm:
            raise InvalidUpdate(f"{name!r} has norm {norm:.3g} > limit {max_norm:.3g}")
