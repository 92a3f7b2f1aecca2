"""`bbfl compare`: several runs in one table, with accuracy-vs-cost plots and an HTML page."""

from __future__ import annotations

import typer

from bbfl.cli._app import app, console, fail
from bbfl.exceptions import BBFLError


@app.command()
def compare(
    runs: list[str] = typer.Argument(
        ..., help="Run directories, or folders holding run directories (e.g. `runs/`).", show_default=False
    ),
    out: str = typer.Option("compare", help="Folder for compare.html, compare.json and the PNG plots."),
) -> None:
    """Line runs up: one row per configuration (seeds grouped: accuracy mean ± std), with queries, bytes
    up/down per client-round, peak memory and time; plots of accuracy vs. queries and vs. bytes as PNG and
    a self-contained HTML page. Reads the run directories only: nothing is re-run or unpickled."""
    from bbfl.compare import compare_runs
    from bbfl.report import summary_table

    try:
        rows, title, written = compare_runs(runs, out)
    except BBFLError as exc:
        fail(exc)
    console.print(summary_table(rows, title))
    for name, path in written.items():
        console.print(f"{name}: {path}", markup=False, highlight=False)
