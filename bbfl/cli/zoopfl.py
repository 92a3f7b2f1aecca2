"""`bbfl zoopfl`: personalised FL by input surgery + semantic re-mapping around a black box."""

from __future__ import annotations

import typer
from rich.markup import escape

from bbfl.cli._app import (
    DEVICE,
    DTYPE,
    EVAL_EVERY,
    HEAD,
    MAX_LENGTH,
    MODEL,
    OUT,
    STRICT,
    TEST_LIMIT,
    app,
    console,
    fail,
    interrupt_hint,
    metric,
    print_run_dir,
    progress_bar,
    progress_line,
    say_resuming,
)
from bbfl.exceptions import BBFLError


@app.command()
def zoopfl(
    task: str = typer.Option("demo", help="Task name (see `bbfl tasks`) or a custom name with --data-dir."),
    data_dir: str | None = typer.Option(None, help="Folder with train/test files; default $BBFL_DATA_DIR or the hub."),
    spec: str | None = typer.Option(None, help="TOML task spec for custom data."),
    k_shot: int = typer.Option(40, help="Examples per class over all clients (before each client's hold-out)."),
    client_test_fraction: float = typer.Option(0.3, help="Share of each client's data kept as its own test split."),
    test_limit: int | None = TEST_LIMIT,
    strict: bool = STRICT,
    clients: int = typer.Option(10, help="Number of clients."),
    clients_per_round: int | None = typer.Option(None, help="Clients sampled per round (default: all)."),
    rounds: int = typer.Option(10, help="Communication rounds."),
    eval_every: int = EVAL_EVERY,
    partition: str = typer.Option("dirichlet", help="iid, dirichlet or shards."),
    alpha: float = typer.Option(0.1, help="Dirichlet concentration (0.1 = strongly non-IID)."),
    latent_dim: int = typer.Option(8, help="r: the shared encoder's latent size."),
    client_embed_dim: int = typer.Option(4, help="k: each client's private embedding size."),
    prompt_length: int = typer.Option(5, help="L: soft-prefix tokens written by the surgery."),
    estimator: str = typer.Option("random", help="ZO estimator in code space: random (q directions) or coordinate."),
    zo_queries: int = typer.Option(8, help="q: random directions per estimate (one black-box call of q+1)."),
    zo_mu: float = typer.Option(0.05, help="Finite-difference radius in latent units."),
    local_steps: int = typer.Option(5, help="Zeroth-order steps per client per round."),
    lr: float = typer.Option(0.01, help="Adam learning rate of the encoder and client embedding."),
    pretrain_steps: int = typer.Option(50, help="Auto-encoder reconstruction steps in a client's first round."),
    surgery: bool = typer.Option(True, help="Train the input surgery (--no-surgery: re-mapping only)."),
    remap: bool = typer.Option(True, help="Train the semantic re-mapping (--no-remap: surgery only)."),
    federate: bool = typer.Option(True, help="Average the shared surgery (--no-federate: local-only baseline)."),
    seed: int = typer.Option(42, help="Seeds data, partition, decoder, initial weights and clients."),
    model: str | None = MODEL,
    head: str = HEAD,
    device: str = DEVICE,
    dtype: str = DTYPE,
    max_length: int = MAX_LENGTH,
    out: str = OUT,
    resume: str | None = typer.Option(None, help="Continue an interrupted run directory from its last round."),
) -> None:
    """ZooPFL: input surgery + semantic re-mapping, trained by zeroth-order estimates, personalised per client."""
    from bbfl.experiment import BlackBoxConfig, PersonalDataConfig
    from bbfl.federation.engine import EngineConfig
    from bbfl.methods.zoopfl import ZooPFLConfig
    from bbfl.methods.zoopfl.experiment import run_zoopfl_experiment
    from bbfl.report import summary_table

    if resume is not None:  # the saved run's settings win: the title and the lines below say what it really runs
        saved = say_resuming(resume, "zoopfl")
        task, rounds = saved["data"]["task"], saved["engine"]["rounds"]
        clients, partition = saved["data"]["num_clients"], saved["data"]["partition"]  # for the summary's title
    try:
        data_cfg = PersonalDataConfig(
            task=task,
            data_dir=data_dir,
            spec_file=spec,
            k_shot=k_shot,
            test_limit=test_limit,
            strict=strict,
            num_clients=clients,
            partition=partition,
            alpha=alpha,
            client_test_fraction=client_test_fraction,
        )
        zoo_cfg = ZooPFLConfig(
            latent_dim=latent_dim,
            client_embed_dim=client_embed_dim,
            prompt_length=prompt_length,
            estimator=estimator,
            zo_queries=zo_queries,
            zo_mu=zo_mu,
            local_steps=local_steps,
            lr=lr,
            pretrain_steps=pretrain_steps,
            surgery=surgery,
            remap=remap,
            federate=federate,
            seed=seed,
        )
        engine_cfg = EngineConfig(rounds=rounds, clients_per_round=clients_per_round, eval_every=eval_every, seed=seed)
        bb_cfg = BlackBoxConfig(model=model, head=head, device=device, dtype=dtype, max_length=max_length)
        with interrupt_hint("zoopfl") as hint, progress_bar() as progress:
            bar = progress.add_task("ZooPFL", total=rounds)

            def update(record: dict) -> None:
                progress.update(bar, completed=record["round"])
                progress_line(
                    f"round {record['round']:>3}",
                    f"personal acc {metric(record, 'personal_accuracy')}",
                    f"global acc {metric(record, 'test_accuracy')}",
                    f"queries {record.get('train_queries', 0):>7,}",
                    f"up {record['bytes_up_per_client']:,.0f} B",
                )

            run, records = run_zoopfl_experiment(
                data_cfg, zoo_cfg, engine_cfg, bb_cfg, out, update, resume=resume, on_run=hint
            )
    except BBFLError as exc:
        fail(exc)
    first, last = records[0], records[-1]
    rows = [
        {"metric": "personalised accuracy (clients' own tests)", "value": last.get("personal_accuracy", float("nan"))},
        {"metric": "  at round 0 (untrained surgery)", "value": first.get("personal_accuracy", float("nan"))},
        {"metric": "worst client's accuracy", "value": last.get("personal_accuracy_min", float("nan"))},
        {"metric": "global accuracy (shared surgery only)", "value": last.get("test_accuracy", float("nan"))},
        {"metric": "training queries", "value": last.get("train_queries", 0)},
        {"metric": "bytes up / client-round", "value": last["bytes_up_per_client"]},
        {"metric": "bytes down / client-round", "value": last["bytes_down_per_client"]},
    ]
    console.print(summary_table(rows, escape(f"ZooPFL on {task} ({clients} clients, {partition})")))
    print_run_dir(run.path)
