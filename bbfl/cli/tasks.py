"""`bbfl tasks` and `bbfl eval`: list tasks, re-score a saved prompt."""

from __future__ import annotations

import typer

from bbfl.cli._app import TEST_LIMIT, app, console, fail
from bbfl.exceptions import BBFLError


@app.command()
def tasks() -> None:
    """List the known tasks with their classes, template and verbalizer."""
    from rich.table import Table

    from bbfl.data import list_tasks

    table = Table(title="Known tasks (custom ones: --data-dir + --spec)")
    for col in ("task", "classes", "template", "label words"):
        table.add_column(col)
    for spec in list_tasks():
        table.add_row(spec.name, str(len(spec.labels)), spec.template, ", ".join(spec.label_words))
    console.print(table)


@app.command("eval")
def eval_(
    run_dir: str = typer.Argument(..., help="A run directory written by `bbfl bbt`."),
    task: str | None = typer.Option(None, help="Task to score on (default: the run's own)."),
    data_dir: str | None = typer.Option(None, help="Folder with the task's files."),
    spec: str | None = typer.Option(None, help="TOML task spec for custom data."),
    test_limit: int | None = TEST_LIMIT,
) -> None:
    """Re-score a saved prompt on a task's test split."""
    from bbfl.pipeline import DataConfig, evaluate_run
    from bbfl.report import RunDir, summary_table

    try:
        data_cfg = None
        if task is not None or data_dir is not None or test_limit is not None:
            saved = RunDir.open(run_dir).config["data"]
            data_cfg = DataConfig(
                task=task or saved["task"],
                data_dir=data_dir if data_dir else saved["data_dir"],
                spec_file=spec or saved["spec_file"],
                test_limit=test_limit,
            )
        result = evaluate_run(run_dir, data_cfg)
    except BBFLError as exc:
        fail(exc)
    console.print(summary_table([result], f"eval {run_dir}"))
