"""``bbfl compare``: line several runs up in one table, accuracy-vs-cost plots and a self-contained HTML page.

Reading and grouping the run directories is :mod:`bbfl.compare.runs` (what each column means is
documented there); the pictures and the page are :mod:`bbfl.compare.render`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bbfl.compare.render import html_page, plot_png
from bbfl.compare.runs import Group, RunResult, find_runs, group_runs, read_run, shared_fields, table_rows
from bbfl.exceptions import ConfigError
from bbfl.io import atomic_write_bytes, atomic_write_json

__all__ = [
    "Group",
    "RunResult",
    "compare_runs",
    "find_runs",
    "group_runs",
    "html_page",
    "plot_png",
    "read_run",
    "shared_fields",
    "table_rows",
]


def compare_runs(paths: Iterable[str | Path], out_dir: str | Path) -> tuple[list[dict[str, Any]], str, dict[str, Path]]:
    """Read, group and report: writes compare.json, compare.html and the PNG plots into ``out_dir``.

    Returns the display rows, a title naming what all runs share, and the files written.
    """
    runs = [read_run(p) for p in find_runs(paths)]
    if not runs:
        raise ConfigError("no run directories given")
    groups = group_runs(runs)
    rows = table_rows(groups)
    shared = shared_fields(groups)
    title = f"{len(runs)} runs, {len(groups)} configurations" + "".join(f", {k} {v}" for k, v in shared.items())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = {
        name: plot_png(groups, x) for name, x in (("accuracy_vs_queries", "queries"), ("accuracy_vs_bytes", "bytes"))
    }
    images = {name: png for name, png in images.items() if png is not None}
    written = {}
    for name, png in images.items():
        atomic_write_bytes(out / f"{name}.png", png)
        written[name] = out / f"{name}.png"
    atomic_write_bytes(out / "compare.html", html_page(title, rows, images, runs).encode())
    written["html"] = out / "compare.html"
    details = [{**g.row(), "run_dirs": [str(r.path) for r in g.runs]} for g in groups]
    atomic_write_json(out / "compare.json", {"groups": details})
    written["json"] = out / "compare.json"
    return rows, title, written
