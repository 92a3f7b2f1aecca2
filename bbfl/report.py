"""Run directories, atomic files, tables and plots.

A run directory holds ``config.json`` (what was asked), ``metrics.jsonl`` (one JSON object per
step, appended and flushed as the run goes), ``summary.json`` (the final numbers), arrays as
safetensors, and PNG plots. Every whole-file write is atomic: temp file, fsync, rename.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bbfl.exceptions import ConfigError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new content, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def load_arrays(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Load a safetensors file: (arrays, metadata). Never unpickles anything."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


class RunDir:
    """A run's directory: config, streamed metrics, summary, arrays and plots."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, root: str | Path, name: str, config: Mapping[str, Any]) -> RunDir:
        """Make ``root/<name>-<timestamp>`` (unique) and write ``config.json`` there."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(root) / f"{name}-{stamp}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path(root) / f"{name}-{stamp}-{suffix}"
        path.mkdir(parents=True)
        run = cls(path)
        atomic_write_json(path / "config.json", dict(config))
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a run directory (no config.json)")
        return cls(path)

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one metrics record (flushed and fsynced, so a crash keeps what was logged)."""
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(record), default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_json(self.path / "summary.json", dict(summary))

    def plot(self, x: str, ys: Iterable[str], filename: str, title: str = "", where: str | None = None) -> Path | None:
        """Line plot of metrics ``ys`` against ``x`` (records lacking a key are skipped)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = [r for r in self.metrics() if where is None or r.get("phase") == where]
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for y in ys:
            points = [(r[x], r[y]) for r in records if x in r and isinstance(r.get(y), (int, float))]
            points = [p for p in points if math.isfinite(p[1])]
            if points:
                ax.plot(*zip(*points), label=y, marker="." if len(points) < 50 else None)
                drawn = True
        if not drawn:
            plt.close(fig)
            return None
        ax.set_xlabel(x)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = self.path / filename
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out


def summary_table(rows: list[Mapping[str, Any]], title: str):
    """A rich table with one row per mapping (columns = union of keys, in first-seen order)."""
    from rich.table import Table

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in ("method", "metric") else "right")
    for row in rows:
        table.add_row(*[_fmt(row.get(c, "")) for c in columns])
    return table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
