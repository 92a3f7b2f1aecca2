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
from collections.abc import Mapping
from typing import Any

import numpy as np

from bbfl.exceptions import BBFLError

HEADER_KEY = "bbfl"
WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}


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


def decode_message(blob: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Parse bytes from :func:`encode_message`; arrays come back as float32. Bad bytes -> InvalidUpdate."""
    from safetensors.numpy import load

    try:
        arrays = load(blob)
        header_text = _read_metadata(blob).get(HEADER_KEY, "{}")
        header = json.loads(header_text)
    except Exception as exc:  # safetensors raises several types for corrupt input
        raise InvalidUpdate(f"undecodable message ({type(exc).__name__}: {exc})") from exc
    if not isinstance(header, dict):
        raise InvalidUpdate(f"message header should be a JSON object, got {type(header).__name__}")
    return {k: v.astype(np.float32) for k, v in arrays.items()}, header


def _read_metadata(blob: bytes) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header length, then the JSON header
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + size]).get("__metadata__", {}) or {}


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
        norm = float(np.linalg.norm(value))
        if max_norm is not None and norm > max_norm:
            raise InvalidUpdate(f"{name!r} has norm {norm:.3g} > limit {max_norm:.3g}")
