"""`bbfl tasks` and `bbfl eval`: list tasks, re-score a saved prompt."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from bbfl.cli._app import TEST_LIMIT, app, console, fail
from bbfl.exceptions import BBFLError, DataError

MODEL_OVERRIDE = typer.Option(
    None, help="Score on this model instead of the run's (local dir, hub name or http://HOST:PORT of `bbfl serve`)."
)


@app.command()
def tasks() -> None:
    """List the known tasks with their classes, template and verbalizer."""
    from rich.table import Table

    from bbfl.data import list_tasks

    table = Table(title="Known tasks (custom ones: --data-dir + --spec)")
    for col in ("task", "classes", "template", "label words", "causal LMs read (else the template)"):
        table.add_column(col)
    for spec in list_tasks():
        causal = ""
        if spec.causal_template:  # shown on one line: the template's newline as \n
            shown = spec.causal_template.replace("\n", "\\n")
            causal = f"{shown} ({', '.join(spec.causal_label_words or spec.label_words)})"
        words = ", ".join(spec.label_words)
        table.add_row(spec.name, str(len(spec.labels)), escape(spec.template), escape(words), escape(causal))
    console.print(table)


@app.command("eval")
def eval_(
    run_dir: str = typer.Argument(..., help="A run directory written by `bbfl bbt` or `bbfl fedbpt`."),
    task: str | None = typer.Option(None, help="Task to score on (default: the run's own)."),
    data_dir: str | None = typer.Option(None, help="Folder with the task's files (default: the run's own)."),
    spec: str | None = typer.Option(None, help="TOML task spec for custom data."),
    test_limit: int | None = TEST_LIMIT,
    model: str | None = MODEL_OVERRIDE,
) -> None:
    """Re-score a saved soft prompt (bbt, fedbpt) on a task's test split."""
    from bbfl.experiment import DataConfig
    from bbfl.methods.bbt.experiment import evaluate_run
    from bbfl.report import RunDir, summary_table

    try:
        saved = DataConfig.from_saved(RunDir.open(run_dir).config["data"])
        same = task is None or task == saved.task  # another task does not inherit the run's files
        data_cfg = DataConfig(
            task=task or saved.task,
            data_dir=data_dir or (saved.data_dir if same else None),
            spec_file=spec or (saved.spec_file if same else None),
            test_limit=test_limit if test_limit is not None else saved.test_limit,
            spec_overrides=saved.spec_overrides if same else {},
        )
        if data_dir is None and data_cfg.data_dir and not Path(data_cfg.data_dir).is_dir():
            raise DataError(f"the run's data dir {data_cfg.data_dir} is not on this machine: pass --data-dir")
        result = evaluate_run(run_dir, data_cfg, model=model)
    except BBFLError as exc:
        fail(exc)
    console.print(summary_table([result], escape(f"eval {run_dir}")))
