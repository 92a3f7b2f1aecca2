"""The Typer app, console and small helpers every command module shares."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import bbfl
from bbfl.exceptions import BBFLError, ConfigError

app = typer.Typer(
    help="bbfl: black-box and zeroth-order (federated) prompt tuning of frozen models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()


def _print_version(value: bool) -> None:
    if value:
        console.print(f"bbfl {bbfl.__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """bbfl: black-box and zeroth-order (federated) prompt tuning of frozen models."""


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
PROMPT_ATTENTION = typer.Option(
    "auto", help="full (the BBT paper's function; auto) or prefix (faster: prompt reads only itself)."
)
PROMPT_PLACEMENT = typer.Option(
    "auto",
    help="Where the soft prompt enters: after_embeddings (official BBT: A z added to the embedding layer's "
    "output; auto for MLM heads on BERT/RoBERTa) or inputs_embeds (p0 + A z fed as word embeddings; auto otherwise).",
)
PROMPT_POSITION = typer.Option(
    "start",
    help="start (the papers': prompt before the input) or after_input (causal head: input, then prompt, then "
    "template tail; the input's key/values computed once and shared by the whole population; exact).",
)
MAX_LENGTH = typer.Option(128, help="Truncate examples to this many tokens.")
OUT = typer.Option("runs", help="Parent folder of the run directory.")
# data options every command that loads a task shares
TEST_LIMIT = typer.Option(
    None, help="Score a seeded, stratified random sample of N test examples (rows recorded in config.json)."
)
STRICT = typer.Option(False, "--strict", help="Refuse data files with empty texts (default: skip those rows, warn).")


class _DataLogHandler(logging.Handler):
    """Prints bbfl.data's lines (the task in use at each run's start, data warnings) on the console."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        style = "yellow" if prefix else "dim"
        console.print(prefix + record.getMessage(), style=style, markup=False, highlight=False, soft_wrap=True)


def show_data_messages() -> None:
    """Route the data layer's log lines (template, verbalizer, skipped rows, samples) to the console, once."""
    logger = logging.getLogger("bbfl.data")
    if not any(isinstance(h, _DataLogHandler) for h in logger.handlers):
        logger.addHandler(_DataLogHandler())
        logger.setLevel(logging.INFO)


show_data_messages()

# config fields whose flag is not simply the field name with dashes
FLAG_NAMES = {
    "num_clients": "--clients",
    "transport_dtype": "--transport",
    "spec_file": "--spec",
}


def _all_flags() -> set[str]:
    import typer.main

    group = typer.main.get_command(app)
    return {opt for cmd in group.commands.values() for p in cmd.params for opt in getattr(p, "opts", [])}


def flag_names(message: str) -> str:
    """Config errors name dataclass fields in backticks (`num_clients`); on the command line they are flags.

    Only names that are a flag of some command are rewritten (`flwr`, a tool's name, stays as it is).
    """
    flags = _all_flags()

    def flag(match: re.Match) -> str:
        name = FLAG_NAMES.get(match[1], "--" + match[1].replace("_", "-"))
        return name if name in flags else match[0]

    return re.sub(r"`([a-z][a-z0-9_]*)`", flag, message)


def fail(exc: Exception) -> None:
    """Print a bbfl error as one red line and exit with status 2 (no traceback for bad input).

    The message is escaped: user text and install hints hold square brackets (`bbfl[hub]`, a path
    like `runs[/old]`) that rich would otherwise read as markup (and drop, or crash on).
    """
    console.print(f"[bold red]error:[/] {escape(flag_names(str(exc)))}", soft_wrap=True)
    raise typer.Exit(code=2)


def say(text: str, style: str = "dim") -> None:
    """One line of user-facing text that may hold paths or brackets: printed literally, never as markup."""
    console.print(f"[{style}]{escape(text)}[/]" if style else escape(text), soft_wrap=True)


def is_interactive() -> bool:
    return sys.stderr.isatty() or sys.stdout.isatty()


def progress_bar() -> Progress:
    """A bar on a terminal; piped output gets the commands' one-line-per-round (or per dev check) prints."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not is_interactive(),
    )


def progress_line(*fields: str) -> None:
    """Print fields two spaces apart; where the console is too narrow, break between fields, never inside one."""
    width, lines, line = max(40, console.width), [], ""
    for field in fields:
        if line and len(line) + 2 + len(field) > width:
            lines.append(line)
            line = "   " + field
        else:
            line = f"{line}  {field}" if line else field
    lines.append(line)
    for text in lines:
        console.print(text, markup=False, highlight=False, soft_wrap=True)


def refuse_finished(resume: str, command: str) -> None:
    """``--resume`` on a finished run (it has summary.json): say so, change nothing, exit 0."""
    summary = Path(resume) / "summary.json"
    if summary.is_file():
        say(f"{resume} is already finished (it has summary.json): nothing to resume, nothing was changed.", "")
        say(f"its results: {summary}; a new run: `bbfl {command}` without --resume")
        raise typer.Exit(code=0)


def print_run_dir(path) -> None:
    console.print(f"run directory: [bold]{escape(str(path))}[/]", soft_wrap=True)


def open_resume(resume: str, command: str) -> dict:
    """The config.json of the run to resume (a finished run exits here, untouched); prints the resuming line."""
    from bbfl.report import RunDir

    refuse_finished(resume, command)
    try:
        config = RunDir.open(resume).config
    except BBFLError as exc:
        fail(exc)
    if config.get("method", "bbt") != command:
        fail(ConfigError(f"{resume} is a {config.get('method')} run, not a {command} run: resume it with its command"))
    return config


def say_resuming(resume: str, command: str) -> dict:
    """Open a federated run to resume and say what it runs: its own settings, whatever flags were given."""
    saved = open_resume(resume, command)
    data, rounds = saved["data"], saved["engine"]["rounds"]
    say(
        f"resuming {resume} ({data['task']}, {data['num_clients']} clients, {data.get('partition', 'iid')}, "
        f"{rounds} rounds): its own settings are used"
    )
    return saved


class RunHint:
    """Where the current run directory is, so that Ctrl-C can say how to continue it."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def __call__(self, run) -> None:  # the pipelines' on_run callback
        self.path = Path(run.path)


@contextmanager
def interrupt_hint(command: str) -> Iterator[RunHint]:
    """On Ctrl-C: one line with the run directory and the command that resumes it, exit 130."""
    hint = RunHint()
    try:
        yield hint
    except KeyboardInterrupt:
        if hint.path is None:
            say("interrupted before the run directory was made: nothing to resume", "yellow")
        else:
            say(f"interrupted: the run is in {hint.path}; continue it with", "yellow")
            say(f"  bbfl {command} --resume {hint.path}", "")
        raise typer.Exit(code=130) from None


EVAL_EVERY = typer.Option(
    1,
    min=1,
    help="Score the test split every N rounds (round 0 and the last always): a real LM's test set can cost "
    "more than a round of training, and skipping it changes nothing that is trained.",
)


def metric(record: dict, key: str, spec: str = ".4f") -> str:
    """A record's metric formatted, or a dash where that round did not measure it (``--eval-every``)."""
    value = record.get(key)
    return format(value, spec) if isinstance(value, (int, float)) else "–"


DP_CLIP = typer.Option(
    None, help="Differential privacy: each client clips its update to this L2 norm (FedBPT: --aggregation fedavg)."
)
DP_NOISE = typer.Option(0.0, help="Differential privacy: server Gaussian noise multiplier (std = it x clip / clients).")
