"""`bbfl fedbpt`: federated black-box prompt tuning on the in-process engine."""

from __future__ import annotations

import json
import math

import typer
from rich.markup import escape

from bbfl.cli._app import (
    DEVICE,
    DP_CLIP,
    DP_NOISE,
    DTYPE,
    EVAL_EVERY,
    HEAD,
    MAX_LENGTH,
    MODEL,
    OUT,
    PROMPT_ATTENTION,
    PROMPT_PLACEMENT,
    PROMPT_POSITION,
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
    say,
    say_resuming,
)
from bbfl.exceptions import BBFLError, ConfigError

FEDBPT_DEMO_PRESET = {"rounds": 10, "k_shot": 40, "prompt_length": 10}


@app.command()
def fedbpt(
    task: str = typer.Option("demo", help="Task name (see `bbfl tasks`) or a custom name with --data-dir."),
    data_dir: str | None = typer.Option(None, help="Folder with train/test files; default $BBFL_DATA_DIR or the hub."),
    spec: str | None = typer.Option(None, help="TOML task spec for custom data."),
    k_shot: int | None = typer.Option(None, help="Examples per class over all clients (paper: 200)."),
    test_limit: int | None = TEST_LIMIT,
    strict: bool = STRICT,
    clients: int = typer.Option(10, help="Number of clients."),
    clients_per_round: int | None = typer.Option(None, help="Clients sampled per round (default: all)."),
    fraction: float | None = typer.Option(None, help="Share of clients sampled per round (alternative to the above)."),
    rounds: int | None = typer.Option(None, help="Communication rounds (paper: 200)."),
    eval_every: int = EVAL_EVERY,
    partition: str = typer.Option("iid", help="iid, dirichlet or shards."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (smaller = more label skew)."),
    shards_per_client: int = typer.Option(2, help="Label shards per client for --partition shards."),
    dropout: float = typer.Option(0.0, help="Probability a sampled client drops out of a round."),
    deadline: float | None = typer.Option(None, help="Seconds before a client's update counts as late."),
    local_popsize: int = typer.Option(5, help="Client CMA-ES population."),
    local_iter: int = typer.Option(8, help="Client CMA-ES generations per round."),
    intrinsic_dim: int = typer.Option(500, help="d: CMA-ES search dimension."),
    prompt_length: int | None = typer.Option(None, help="L: soft-prompt tokens (paper: 50)."),
    perturb_rate: float = typer.Option(
        0.5,
        help="Fitness = loss / loss on a copy with this share of tokens replaced, drawn each round (the paper's "
        "0.5); 0 = plain loss (half the cost; smallest clients lead on label-skewed splits, see README).",
    ),
    aggregation: str = typer.Option(
        "fedbpt",
        help="fedbpt (paper: server CMA-ES ranks the client means by each client's own fitness), fedavg "
        "(example-weighted mean of client means; with --perturb-rate 0 the better rule on label-skewed splits, "
        "see README), or robust: median, trimmed, krum.",
    ),
    trim: float = typer.Option(0.2, help="Share of client values trimmed per side for --aggregation trimmed."),
    num_malicious: int = typer.Option(0, help="Poisoned clients Krum should tolerate (--aggregation krum)."),
    sigma0: float = typer.Option(1.0, help="Initial CMA-ES step size."),
    min_sigma: float = typer.Option(
        0.0, help="Floor of the global step size (0 = none: the official floor never acts)."
    ),
    uplink: str = typer.Option("dense", help="dense (the client's mean) or replay (seed + candidate ranks, ~190 B)."),
    downlink_covariance: bool = typer.Option(
        False, help="Also send the server's covariance C to clients (d*d floats more per client-round)."
    ),
    transport: str = typer.Option("float32", help="float32 or float16 arrays on the wire."),
    dp_clip: float | None = DP_CLIP,
    dp_noise: float = DP_NOISE,
    seed: int = typer.Option(42, help="Seeds data, partition, A, server and clients."),
    model: str | None = MODEL,
    head: str = HEAD,
    device: str = DEVICE,
    dtype: str = DTYPE,
    prompt_attention: str = PROMPT_ATTENTION,
    prompt_placement: str = PROMPT_PLACEMENT,
    prompt_position: str = PROMPT_POSITION,
    max_length: int = MAX_LENGTH,
    out: str = OUT,
    resume: str | None = typer.Option(None, help="Continue an interrupted run directory from its last round."),
) -> None:
    """FedBPT: clients run local CMA-ES, the server aggregates search distributions (Sun et al., 2024)."""
    from bbfl.experiment import BlackBoxConfig, FederatedDataConfig
    from bbfl.federation.engine import EngineConfig
    from bbfl.methods.fedbpt import FedBPTConfig
    from bbfl.methods.fedbpt.experiment import run_fedbpt_experiment
    from bbfl.report import summary_table

    if resume is not None:  # the saved run's settings win: the title and the lines below say what it really runs
        saved = say_resuming(resume, "fedbpt")
        task, rounds = saved["data"]["task"], saved["engine"]["rounds"]
        clients, partition = saved["data"]["num_clients"], saved["data"]["partition"]  # for the summary's title
    preset = FEDBPT_DEMO_PRESET if task == "demo" else {}
    k_shot = k_shot if k_shot is not None else preset.get("k_shot", 200)
    rounds = rounds if rounds is not None else preset.get("rounds", 200)
    prompt_length = prompt_length if prompt_length is not None else preset.get("prompt_length", 50)
    try:
        if fraction is not None:
            if not 0.0 < fraction <= 1.0:
                raise ConfigError(f"--fraction should be in (0, 1], got {fraction}")
            clients_per_round = max(1, math.ceil(fraction * clients))
        if preset and resume is None:
            say(
                f"demo preset: rounds={rounds}, k_shot={k_shot}, prompt_length={prompt_length} "
                "(paper: 200, 200, 50 — pass flags to change)"
            )
        data_cfg = FederatedDataConfig(
            task=task,
            data_dir=data_dir,
            spec_file=spec,
            k_shot=k_shot,
            test_limit=test_limit,
            strict=strict,
            num_clients=clients,
            partition=partition,
            alpha=alpha,
            shards_per_client=shards_per_client,
        )
        fed_cfg = FedBPTConfig(
            intrinsic_dim=intrinsic_dim,
            prompt_length=prompt_length,
            local_popsize=local_popsize,
            local_iter=local_iter,
            perturb_rate=perturb_rate,
            aggregation=aggregation,
            trim=trim,
            num_malicious=num_malicious,
            sigma0=sigma0,
            min_sigma=min_sigma,
            uplink=uplink,
            downlink_covariance=downlink_covariance,
            dp_clip=dp_clip,
            dp_noise=dp_noise,
            seed=seed,
        )
        engine_cfg = EngineConfig(
            rounds=rounds,
            clients_per_round=clients_per_round,
            dropout=dropout,
            deadline=deadline,
            transport_dtype=transport,
            eval_every=eval_every,
            seed=seed,
        )
        bb_cfg = BlackBoxConfig(
            model=model,
            head=head,
            device=device,
            dtype=dtype,
            prompt_attention=prompt_attention,
            prompt_placement=prompt_placement,
            prompt_position=prompt_position,
            max_length=max_length,
        )
        with interrupt_hint("fedbpt") as hint, progress_bar() as progress:
            bar = progress.add_task("FedBPT", total=rounds)

            def update(record: dict) -> None:
                progress.update(bar, completed=record["round"])
                progress_line(
                    f"round {record['round']:>3}",
                    f"test acc {metric(record, 'test_accuracy')}",
                    f"queries {record.get('train_queries', 0):>7,}",
                    f"up {record['bytes_up_per_client']:,.0f} B",
                    f"down {record['bytes_down_per_client']:,} B",
                    f"clients {len(record['aggregated'])}",
                    *([f"rejected {len(record['rejected'])}"] if record["rejected"] else []),
                )

            run, records = run_fedbpt_experiment(
                data_cfg, fed_cfg, engine_cfg, bb_cfg, out, update, resume=resume, on_run=hint
            )
    except BBFLError as exc:
        fail(exc)
    last = records[-1]
    summary = json.loads((run.path / "summary.json").read_text())
    rows = [
        {"metric": "global test accuracy", "value": last.get("test_accuracy", float("nan"))},
        {"metric": "zero-shot accuracy (no prompt)", "value": summary["zero_shot_test_accuracy"]},
        {"metric": "starting prompt accuracy (round 0, z = 0)", "value": records[0].get("test_accuracy", float("nan"))},
        {"metric": "best round accuracy", "value": max(r.get("test_accuracy", 0.0) for r in records)},
        {"metric": "training queries", "value": last.get("train_queries", 0)},
        {"metric": "bytes up / client-round", "value": last["bytes_up_per_client"]},
        {"metric": "bytes down / client-round", "value": last["bytes_down_per_client"]},
        {"metric": "rounds", "value": last["round"]},
    ]
    console.print(summary_table(rows, escape(f"FedBPT on {task} ({clients} clients, {partition})")))
    print_run_dir(run.path)
