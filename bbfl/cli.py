"""The ``bbfl`` command line.

bbfl bbt                                   # offline demo: embedded MiniLM + bundled demo task
bbfl bbt --task sst2 --data-dir ../shared/data/sst2
bbfl tasks                                 # the known tasks
bbfl eval runs/bbt-sst2-... --task sst2 --data-dir ../shared/data/sst2
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bbfl.exceptions import BBFLError

app = typer.Typer(
    help="bbfl: black-box and zeroth-order (federated) prompt tuning of frozen models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

# The bundled demo must finish in a few minutes on 2 CPU cores, so it runs a shorter search than
# the paper's 8,000 queries; every other task gets the paper defaults unless flags say otherwise.
DEMO_PRESET = {"budget": 400, "k_shot": 8, "prompt_length": 10}
FEDBPT_DEMO_PRESET = {"rounds": 10, "k_shot": 40, "prompt_length": 10}


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


@app.command()
def bbt(
    task: str = typer.Option("demo", help="Task name (see `bbfl tasks`) or a custom name with --data-dir."),
    data_dir: str | None = typer.Option(
        None, help="Folder with train/test files (jsonl/csv/tsv); default $BBFL_DATA_DIR or the datasets hub."
    ),
    spec: str | None = typer.Option(None, help="TOML task spec for custom data (labels, template, words)."),
    k_shot: int | None = typer.Option(None, help="Examples per class for train and for dev (paper: 16)."),
    test_limit: int | None = typer.Option(None, help="Score only the first N test examples."),
    budget: int | None = typer.Option(None, help="Training queries (candidate x batch) (paper: 8000)."),
    intrinsic_dim: int = typer.Option(500, help="d: dimension CMA-ES searches in."),
    prompt_length: int | None = typer.Option(None, help="L: soft-prompt tokens (paper: 50)."),
    popsize: int = typer.Option(20, help="CMA-ES population per generation."),
    sigma0: float = typer.Option(1.0, help="CMA-ES initial step size."),
    alpha: float = typer.Option(1.0, help="Scale of the random projection A."),
    loss: str = typer.Option("auto", help="auto (task's), ce or hinge."),
    eval_every: int = typer.Option(100, help="Dev selection every N training queries."),
    prompt_init: str = typer.Option(".", help="Token or text whose embedding is the prompt at z = 0."),
    seed: int = typer.Option(42, help="Seeds the few-shot draw, A and CMA-ES."),
    model: str | None = typer.Option(None, help="Local model dir or hub name (default: embedded MiniLM)."),
    head: str = typer.Option("auto", help="auto, encoder (similarity to label descriptions), mlm or causal."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 for the frozen model."),
    prompt_attention: str = typer.Option("auto", help="prefix (fast: prompt reads only itself), full, or auto."),
    max_length: int = typer.Option(128, help="Truncate examples to this many tokens."),
    whitebox: bool = typer.Option(False, help="Also run white-box prompt tuning (backprop) as a reference."),
    whitebox_steps: int = typer.Option(200, help="Adam steps for --whitebox."),
    out: str = typer.Option("runs", help="Parent folder of the run directory."),
    resume: str | None = typer.Option(
        None, help="Continue an interrupted run directory from its checkpoint (its own settings are used)."
    ),
) -> None:
    """Black-Box Tuning: CMA-ES in a random subspace projected to a soft prompt (Sun et al., 2022)."""
    from bbfl.methods.bbt import BBTConfig
    from bbfl.methods.prompt_tuning import PromptTuningConfig
    from bbfl.pipeline import BlackBoxConfig, DataConfig, run_bbt_experiment
    from bbfl.report import summary_table

    if resume is not None:
        from bbfl.report import RunDir

        try:
            saved = RunDir.open(resume).config
        except BBFLError as exc:
            _fail(exc)
        task, budget, seed = saved["data"]["task"], saved["bbt"]["budget"], saved["bbt"]["seed"]
        console.print(f"[dim]resuming {resume} ({task}, budget {budget})[/]")
    preset = DEMO_PRESET if task == "demo" else {}
    budget = budget if budget is not None else preset.get("budget", 8000)
    k_shot = k_shot if k_shot is not None else preset.get("k_shot", 16)
    prompt_length = prompt_length if prompt_length is not None else preset.get("prompt_length", 50)
    if preset and resume is None:
        console.print(
            f"[dim]demo preset: budget={budget}, k_shot={k_shot}, prompt_length={prompt_length} "
            "(paper defaults: 8000, 16, 50 — pass flags to change)[/]"
        )
    try:
        cfg = BBTConfig(
            intrinsic_dim=intrinsic_dim,
            prompt_length=prompt_length,
            popsize=popsize,
            budget=budget,
            sigma0=sigma0,
            alpha=alpha,
            loss=loss,
            eval_every=eval_every,
            prompt_init=prompt_init,
            seed=seed,
        )
        data_cfg = DataConfig(task=task, data_dir=data_dir, spec_file=spec, k_shot=k_shot, test_limit=test_limit)
        bb_cfg = BlackBoxConfig(
            model=model, head=head, device=device, dtype=dtype, prompt_attention=prompt_attention, max_length=max_length
        )
        with _progress() as progress:
            bar = progress.add_task("BBT", total=budget)

            def update(record: dict) -> None:
                desc = f"BBT loss {record['train_loss']:.3f} dev {record.get('best_dev_accuracy', float('nan')):.3f}"
                progress.update(bar, completed=record["queries"], description=desc)

            run, rows = run_bbt_experiment(
                data_cfg,
                cfg,
                bb_cfg,
                out,
                PromptTuningConfig(steps=whitebox_steps) if whitebox else None,
                update,
                resume=resume,
            )
    except BBFLError as exc:
        _fail(exc)
    console.print(summary_table(rows, f"BBT on {task} (seed {seed})"))
    console.print(f"run directory: [bold]{run.path}[/]")


@app.command()
def fedbpt(
    task: str = typer.Option("demo", help="Task name (see `bbfl tasks`) or a custom name with --data-dir."),
    data_dir: str | None = typer.Option(None, help="Folder with train/test files; default $BBFL_DATA_DIR or the hub."),
    spec: str | None = typer.Option(None, help="TOML task spec for custom data."),
    k_shot: int | None = typer.Option(None, help="Examples per class over all clients (paper: 200)."),
    test_limit: int | None = typer.Option(None, help="Score only the first N test examples each round."),
    clients: int = typer.Option(10, help="Number of clients."),
    clients_per_round: int | None = typer.Option(None, help="Clients sampled per round (all)."),
    rounds: int | None = typer.Option(None, help="Communication rounds (paper: 200)."),
    partition: str = typer.Option("iid", help="iid, dirichlet or shards."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (smaller = more label skew)."),
    dropout: float = typer.Option(0.0, help="Probability a sampled client drops out of a round."),
    deadline: float | None = typer.Option(None, help="Seconds before a client's update counts as late."),
    local_popsize: int = typer.Option(5, help="Client CMA-ES population."),
    local_iter: int = typer.Option(8, help="Client CMA-ES generations per round."),
    intrinsic_dim: int = typer.Option(500, help="d: CMA-ES search dimension."),
    prompt_length: int | None = typer.Option(None, help="L: soft-prompt tokens (paper: 50)."),
    perturb_rate: float = typer.Option(0.0, help="> 0: fitness = loss / loss on token-perturbed data (paper: 0.5)."),
    aggregation: str = typer.Option("fedbpt", help="fedbpt (server CMA-ES) or fedavg (mean of client means)."),
    transport: str = typer.Option("float32", help="float32 or float16 arrays on the wire."),
    seed: int = typer.Option(42, help="Seeds data, partition, A, server and clients."),
    model: str | None = typer.Option(None, help="Local model dir or hub name (default: embedded MiniLM)."),
    head: str = typer.Option("auto", help="auto, encoder, mlm or causal."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    out: str = typer.Option("runs", help="Parent folder of the run directory."),
    resume: str | None = typer.Option(None, help="Continue an interrupted run directory from its last round."),
) -> None:
    """FedBPT: clients run local CMA-ES, the server aggregates search distributions (Sun et al., 2024)."""
    from bbfl.federation.engine import EngineConfig
    from bbfl.methods.fedbpt import FedBPTConfig
    from bbfl.pipeline import BlackBoxConfig, FederatedDataConfig, run_fedbpt_experiment
    from bbfl.report import RunDir, summary_table

    preset = FEDBPT_DEMO_PRESET if task == "demo" else {}
    k_shot = k_shot if k_shot is not None else preset.get("k_shot", 200)
    rounds = rounds if rounds is not None else preset.get("rounds", 200)
    prompt_length = prompt_length if prompt_length is not None else preset.get("prompt_length", 50)
    try:
        if resume is not None:
            rounds = RunDir.open(resume).config["engine"]["rounds"]
        elif preset:
            console.print(
                f"[dim]demo preset: rounds={rounds}, k_shot={k_shot}, prompt_length={prompt_length} "
                "(paper: 200, 200, 50 — pass flags to change)[/]"
            )
        data_cfg = FederatedDataConfig(
            task=task,
            data_dir=data_dir,
            spec_file=spec,
            k_shot=k_shot,
            test_limit=test_limit,
            num_clients=clients,
            partition=partition,
            alpha=alpha,
        )
        fed_cfg = FedBPTConfig(
            intrinsic_dim=intrinsic_dim,
            prompt_length=prompt_length,
            local_popsize=local_popsize,
            local_iter=local_iter,
            perturb_rate=perturb_rate,
            aggregation=aggregation,
            seed=seed,
        )
        engine_cfg = EngineConfig(
            rounds=rounds,
            clients_per_round=clients_per_round,
            dropout=dropout,
            deadline=deadline,
            transport_dtype=transport,
            seed=seed,
        )
        bb_cfg = BlackBoxConfig(model=model, head=head, device=device, dtype=dtype)
        with _progress() as progress:
            bar = progress.add_task("FedBPT", total=rounds)

            def update(record: dict) -> None:
                progress.update(bar, completed=record["round"])
                console.print(
                    f"round {record['round']:>4}  test acc {record.get('test_accuracy', float('nan')):.4f}  "
                    f"queries {record.get('train_queries', 0):>8,}  up {record['bytes_up_per_client']:,.0f} B  "
                    f"down {record['bytes_down_per_client']:,} B  clients {len(record['aggregated'])}"
                    + (f"  rejected {len(record['rejected'])}" if record["rejected"] else "")
                )

            run, records = run_fedbpt_experiment(data_cfg, fed_cfg, engine_cfg, bb_cfg, out, update, resume=resume)
    except BBFLError as exc:
        _fail(exc)
    last = records[-1]
    rows = [
        {"metric": "global test accuracy", "value": last.get("test_accuracy", float("nan"))},
        {"metric": "best round accuracy", "value": max(r.get("test_accuracy", 0.0) for r in records)},
        {"metric": "training queries", "value": last.get("train_queries", 0)},
        {"metric": "bytes up / client-round", "value": last["bytes_up_per_client"]},
        {"metric": "bytes down / client-round", "value": last["bytes_down_per_client"]},
        {"metric": "rounds", "value": last["round"]},
    ]
    console.print(summary_table(rows, f"FedBPT on {data_cfg.task} ({clients} clients, {partition})"))
    console.print(f"run directory: [bold]{run.path}[/]")


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
    test_limit: int | None = typer.Option(None, help="Score only the first N test examples."),
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
        _fail(exc)
    console.print(summary_table([result], f"eval {run_dir}"))


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not sys.stderr.isatty() and not sys.stdout.isatty(),
    )


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
