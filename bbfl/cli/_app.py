"""The Typer app, console and small helpers every command module shares."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

app = typer.Typer(
    help="bbfl: black-box and zeroth-order (federated) prompt tuning of frozen models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def fail(exc: Exception) -> None:
    """Print a bbfl error as one red line and exit with status 2 (no traceback for bad input)."""
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not sys.stderr.isatty() and not sys.stdout.isatty(),
    )
