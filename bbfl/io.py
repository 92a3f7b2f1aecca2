"""Atomic, pickle-free file I/O shared by every layer: JSON and safetensors written via temp + fsync + rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bbfl.exceptions import CheckpointError, ConfigError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new content, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a run's files follow the umask like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask (Linux reads it from /proc without changing it; elsewhere set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_arrays(path: str | Path, arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Save arrays (numpy or torch) as safetensors, atomically. Metadata values must be strings."""
    from safetensors.numpy import save

    plain = {
        k: np.ascontiguousarray(np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)) for k, v in arrays.items()
    }
    atomic_write_bytes(path, save(plain, metadata=dict(metadata or {})))


def load_json(path: str | Path) -> Any:
    """A run directory's JSON file; a truncated or garbled one is a :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON (truncated or garbled?): {str(exc)[:120]}") from exc


def load_arrays(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Load a safetensors file: (arrays, metadata). Never unpickles anything.

    Arrays in a dtype numpy lacks (bfloat16, float8) come back as float32. A truncated or garbled
    file is a :class:`CheckpointError` naming it.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    try:
        try:
            with safe_open(str(path), framework="numpy") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except TypeError:  # numpy has no bfloat16/float8: read those through torch and widen
            with safe_open(str(path), framework="pt") as f:
                return {k: _widened(f.get_tensor(k)) for k in f.keys()}, dict(f.metadata() or {})
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # safetensors raises SafetensorError, OSError or ValueError for a bad file
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or garbled?): {exc}") from exc


def _widened(tensor: Any) -> np.ndarray:
    try:
        return tensor.numpy()
    except TypeError:  # bfloat16, float8_*: no numpy dtype
        return tensor.float().numpy()
