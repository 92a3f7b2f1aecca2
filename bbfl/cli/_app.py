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

# Options every command that drives a model shares (one definition, one help text).
MODEL = typer.Option(
    None,
    help="Local model dir, hub name, smollm2 (`bbfl download smollm2`), a .gguf file, "
    "or http://HOST:PORT of a `bbfl serve` (token from $BBFL_SERVE_TOKEN) "
    "(default: embedded MiniLM).",
)
HEAD = typer.Option("auto", help="auto, encoder (similarity to label descriptions), mlm or causal.")
DEVICE = typer.Option("cpu", help="cpu, cuda, cuda:N or auto.")
DTYPE = typer.Option("float32", help="float32, bfloat16 or float16 for the frozen model.")
PROMPT_ATTENTION = typer.Option("auto", help="prefix (fast: prompt reads only itself), full, or auto.")
MAX_LENGTH = typer.Option(128, help="Truncate examples to this many tokens.")
OUT = typer.Option("runs", help="Parent folder of the run directory.")


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


DP_CLIP = typer.Option(
    None, help="Differential privacy: each client clips its update to this L2 norm (FedBPT: --aggregation fedavg)."
)
DP_NOISE = typer.Option(0.0, help="Differential privacy: server Gaussian noise multiplier (std = it x clip / clients).")
