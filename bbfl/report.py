"""Run directories, atomic files, tables and plots.

A run directory holds ``config.json`` (what was asked), ``metrics.jsonl`` (one JSON object per
step, appended and flushed as the run goes), ``summary.json`` (the final numbers), arrays as
safetensors, and PNG plots. Every whole-file write is atomic: temp file, fsync, rename.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bbfl.exceptions import CheckpointError, ConfigError
from bbfl.io import _json_default, atomic_write_bytes, atomic_write_json, load_arrays, load_json, save_arrays

__all__ = ["RunDir", "atomic_write_bytes", "atomic_write_json", "load_arrays", "save_arrays", "summary_table"]


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
        config = load_json(self.path / "config.json")  # a truncated file: CheckpointError naming it
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.path / 'config.json'} holds a {type(config).__name__}, not a JSON object")
        return config

    def rewrite_metrics(self, records: list[Mapping[str, Any]]) -> None:
        """Replace metrics.jsonl atomically (used when a resumed run rebuilds its history)."""
        text = "".join(json.dumps(dict(r), default=_json_default) + "\n" for r in records)
        atomic_write_bytes(self.path / "metrics.jsonl", text.encode())

    def log(self, record: Mapping[str, Any], front: bool = False) -> None:
        """Append one metrics record (flushed and fsynced, so a crash keeps what was logged).

        ``front`` puts it first instead (a resumed run re-logs its zero-shot score there).
        """
        if front:
            self.rewrite_metrics([record, *self.metrics()])
            return
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

    @property
    def finished(self) -> bool:
        """A run is finished once its summary.json is written (the last thing every command writes)."""
        return (self.path / "summary.json").is_file()

    def plot(
        self,
        x: str,
        ys: Iterable[str],
        filename: str,
        title: str = "",
        where: str | None = None,
        ylabel: str | None = None,
        references: Mapping[str, float] | None = None,
        x_from: float | None = None,
    ) -> Path | None:
        """Line plot of metrics ``ys`` against ``x`` saved as ``filename`` (see :meth:`figure`); None if empty."""
        import matplotlib.pyplot as plt

        fig = self.figure(x, ys, title, where, ylabel, references, x_from)
        if fig is None:
            return None
        out = self.path / filename
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out

    def figure(
        self,
        x: str,
        ys: Iterable[str],
        title: str = "",
        where: str | None = None,
        ylabel: str | None = None,
        references: Mapping[str, float] | None = None,
        x_from: float | None = None,
    ):
        """The matplotlib figure of metrics ``ys`` against ``x`` (records lacking a key are skipped).

        ``references`` draws labelled horizontal lines (e.g. the zero-shot accuracy); ``x_from`` drops
        points with a smaller x (round 0 sends no bytes: it is no point on a bytes-per-round curve).
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ys = list(ys)
        records = [r for r in self.metrics() if where is None or r.get("phase") == where]
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for y in ys:
            points = [(r[x], r[y]) for r in records if x in r and isinstance(r.get(y), (int, float))]
            points = [p for p in points if math.isfinite(p[1]) and (x_from is None or p[0] >= x_from)]
            if points:
                ax.plot(*zip(*points), label=y, marker="." if len(points) < 50 else None)
                drawn = True
        if not drawn:
            plt.close(fig)
            return None
        for i, (label, value) in enumerate((references or {}).items()):
            if isinstance(value, (int, float)) and math.isfinite(value):
                ax.axhline(value, color=f"C{7 + i}", linestyle="--", linewidth=1, label=f"{label} {value:.3f}")
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel or (ys[0] if len(ys) == 1 else "value"))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        return fig


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
