"""`bbfl flower-local`: re-run a bbfl federated experiment on a real local Flower deployment."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from bbfl.cli._app import app, console, fail, metric
from bbfl.exceptions import BBFLError, ConfigError


@app.command("flower-local")
def flower_local(
    config: str = typer.Argument(..., help="A run directory of `bbfl fedbpt` / `bbfl zoopfl`, or its config.json."),
    rounds: int | None = typer.Option(None, help="Override the number of rounds."),
    out: str = typer.Option("runs", help="Parent folder of the Flower run directory."),
    timeout: float = typer.Option(3600, help="Seconds to wait for the run to finish."),
) -> None:
    """Start a Flower SuperLink + one SuperNode per client on this machine, run the experiment with
    `flwr run`, poll it to the end, and stop every process. The same ServerApp/ClientApp run across
    machines (see README, "Scale-out on Flower")."""
    from rich.table import Table

    from bbfl.flower.local import LocalFederation
    from bbfl.methods.registry import FEDERATED_METHODS

    try:
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"{config!r} is neither a run directory nor a config.json")
        settings = json.loads(path.read_text())
        if settings.get("method") not in FEDERATED_METHODS:
            raise ConfigError(f"{path} is not a federated run (method {settings.get('method')!r})")
        if rounds is not None:
            settings["engine"]["rounds"] = rounds
        run_dir = Path(out).resolve() / f"flower-{settings['method']}-{time.strftime('%Y%m%d-%H%M%S')}"
        clients = settings["data"]["num_clients"]
        console.print(f"starting a SuperLink and {clients} SuperNodes; run directory {run_dir}")
        with LocalFederation(clients, workdir=run_dir / "flower") as federation:
            status = federation.run(json.dumps(settings), run_dir, timeout=timeout)
    except BBFLError as exc:
        fail(exc)
    console.print(f"Flower run status: [bold]{status.get('status')}[/] {status.get('status-details', '')}")
    records = json.loads((run_dir / "rounds.json").read_text()) if (run_dir / "rounds.json").is_file() else []
    table = Table(title=f"{settings['method']} on Flower ({clients} SuperNodes)")
    for col in ("round", "test accuracy", "clients", "bytes up / client"):
        table.add_column(col)
    for r in records:
        table.add_row(
            str(r["round"]),
            metric(r, "test_accuracy"),
            str(len(r["aggregated"])),
            f"{r['bytes_up_per_client']:,.0f}",
        )
    console.print(table)
    if not status.get("status", "").endswith("completed"):
        raise typer.Exit(code=1)
