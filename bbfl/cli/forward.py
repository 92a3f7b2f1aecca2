"""`bbfl fwdllm` and `bbfl fedkseed`: forward-only federated tuning of PEFT weights (no backward pass)."""

from __future__ import annotations

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

TASK = typer.Option("demo", help="Task name (see `bbfl tasks`) or a custom name with --data-dir.")
DATA_DIR = typer.Option(None, help="Folder with train/test files; default $BBFL_DATA_DIR or the hub.")
K_SHOT = typer.Option(40, help="Examples per class over all clients.")
SPEC = typer.Option(None, help="TOML task spec for custom data (labels, template, words).")
CLIENTS = typer.Option(10, help="Number of clients.")
PER_ROUND = typer.Option(None, help="Clients sampled per round (default: all).")
ROUNDS = typer.Option(20, help="Communication rounds.")
PARTITION = typer.Option("iid", help="iid, dirichlet or shards.")
ALPHA = typer.Option(0.5, help="Dirichlet concentration (smaller = more label skew).")
PEFT = typer.Option("lora", help="Tuned weights: lora, bitfit, adapter, prompt or full (small models only).")
RANK = typer.Option(8, help="LoRA rank r (alpha = 2r, as FwdLLM).")
PROMPT_LENGTH = typer.Option(10, help="Soft-prompt tokens for --peft prompt.")
BATCH = typer.Option(16, help="Examples per client batch.")
SEED = typer.Option(42, help="Seeds data, partition, initial weights and clients.")
LOW_MEMORY = typer.Option(
    False, help="Edge profile: bf16 forward (fp32 master of the tuned weights only) and a 4k-token chunk cap."
)
RESUME = typer.Option(None, help="Continue an interrupted run directory from its last round.")


def _blackbox(model, head, device, dtype, max_length, low_memory):
    """The frozen model's config; ``--low-memory`` is the edge profile (bf16 forward, small chunks)."""
    from bbfl.experiment import BlackBoxConfig

    return BlackBoxConfig(
        model=model,
        head=head,
        device=device,
        dtype="bfloat16" if low_memory and dtype == "float32" else dtype,
        max_length=max_length,
        max_tokens=4096 if low_memory else 32768,  # the batch is chunked to this many tokens per forward
    )


def _run(name, data_cfg, method_cfg, engine_cfg, bb_cfg, out, resume):
    from bbfl.methods.fwdllm.experiment import run_forward_experiment

    with interrupt_hint(name) as hint, progress_bar() as progress:
        bar = progress.add_task(name, total=engine_cfg.rounds)

        def update(record: dict) -> None:
            progress.update(bar, completed=record["round"])
            progress_line(
                f"round {record['round']:>3}",
                f"test acc {metric(record, 'test_accuracy')}",
                f"queries {record.get('train_queries', 0):>7,}",
                f"up {record['bytes_up_per_client']:,.0f} B",
                f"down {record['bytes_down_per_client']:,.0f} B",
                f"peak RSS {record.get('cpu_peak_rss_mb', 0):,.0f} MB",
            )

        return run_forward_experiment(
            name, data_cfg, method_cfg, engine_cfg, bb_cfg, out, update, resume=resume, on_run=hint
        )


def _resumed(name: str, resume: str | None, task: str, rounds: int) -> tuple[str, int]:
    """(task, rounds) the run really uses: a resumed run's own, with a line saying it resumes."""
    if resume is None:
        return task, rounds
    saved = say_resuming(resume, name)
    return saved["data"]["task"], saved["engine"]["rounds"]


def _summary(name: str, task: str, run, records: list[dict]) -> None:
    from bbfl.report import summary_table

    first, last = records[0], records[-1]
    rows = [
        {"metric": "global test accuracy", "value": last.get("test_accuracy", float("nan"))},
        {"metric": "  at round 0 (zero-shot)", "value": first.get("test_accuracy", float("nan"))},
        {"metric": "training queries (forward passes on a batch)", "value": last.get("train_queries", 0)},
        {"metric": "bytes up / client-round", "value": last["bytes_up_per_client"]},
        {"metric": "bytes down / client-round", "value": last["bytes_down_per_client"]},
        {"metric": "peak RSS of the process (MB)", "value": last.get("cpu_peak_rss_mb", float("nan"))},
    ]
    if "cuda_peak_allocated_mb" in last:
        rows.append({"metric": "peak CUDA memory (MB)", "value": last["cuda_peak_allocated_mb"]})
    console.print(summary_table(rows, escape(f"{name} on {task}")))
    print_run_dir(run.path)


@app.command()
def fwdllm(
    task: str = TASK,
    data_dir: str | None = DATA_DIR,
    k_shot: int = K_SHOT,
    spec: str | None = SPEC,
    test_limit: int | None = TEST_LIMIT,
    strict: bool = STRICT,
    clients: int = CLIENTS,
    clients_per_round: int | None = PER_ROUND,
    rounds: int = ROUNDS,
    eval_every: int = EVAL_EVERY,
    partition: str = PARTITION,
    alpha: float = ALPHA,
    peft: str = PEFT,
    rank: int = RANK,
    prompt_length: int = PROMPT_LENGTH,
    estimator: str = typer.Option(
        "central", help="central (FwdLLM's finite difference), jvp (exact forward-mode AD) or backprop (baseline)."
    ),
    h: float = typer.Option(1e-2, help="Finite-difference step of --estimator central."),
    perturbations: int = typer.Option(1, help="Directions per client batch (FwdLLM: 1)."),
    max_perturbations: int = typer.Option(8, help="Cap on directions per batch when pacing adds more."),
    variance_threshold: float | None = typer.Option(
        None, help="Variance-controlled pacing: add directions while the estimate's variance is above this."
    ),
    candidates: int = typer.Option(1, help="Discriminative sampling: candidates per kept direction (FwdLLM: 10)."),
    batch_size: int = BATCH,
    lr: float = typer.Option(0.05, help="Server SGD learning rate (linear decay to 0; backprop: try 0.5)."),
    uplink: str = typer.Option("dense", help="dense (the estimate) or seed (scalars only; server regenerates)."),
    dp_clip: float | None = DP_CLIP,
    dp_noise: float = DP_NOISE,
    seed: int = SEED,
    low_memory: bool = LOW_MEMORY,
    model: str | None = MODEL,
    head: str = HEAD,
    device: str = DEVICE,
    dtype: str = DTYPE,
    max_length: int = MAX_LENGTH,
    out: str = OUT,
    resume: str | None = RESUME,
) -> None:
    """FwdLLM: clients estimate gradients of PEFT weights from perturbed forward passes; server averages + SGD."""
    from bbfl.experiment import FederatedDataConfig
    from bbfl.federation.engine import EngineConfig
    from bbfl.methods.fwdllm import FwdLLMConfig

    task, rounds = _resumed("fwdllm", resume, task, rounds)
    try:
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
        )
        method_cfg = FwdLLMConfig(
            peft=peft,
            rank=rank,
            alpha=2.0 * rank,
            prompt_length=prompt_length,
            estimator=estimator,
            h=h,
            perturbations=perturbations,
            max_perturbations=max(max_perturbations, perturbations),
            variance_threshold=variance_threshold,
            candidates=candidates,
            batch_size=batch_size,
            lr=lr,
            uplink=uplink,
            dp_clip=dp_clip,
            dp_noise=dp_noise,
            seed=seed,
        )
        engine_cfg = EngineConfig(
            rounds=rounds, clients_per_round=clients_per_round, eval_every=eval_every, seed=method_cfg.seed
        )
        bb_cfg = _blackbox(model, head, device, dtype, max_length, low_memory)
        run, records = _run("fwdllm", data_cfg, method_cfg, engine_cfg, bb_cfg, out, resume)
    except BBFLError as exc:
        fail(exc)
    _summary("FwdLLM", task, run, records)


@app.command()
def fedkseed(
    task: str = TASK,
    data_dir: str | None = DATA_DIR,
    k_shot: int = K_SHOT,
    spec: str | None = SPEC,
    test_limit: int | None = TEST_LIMIT,
    strict: bool = STRICT,
    clients: int = CLIENTS,
    clients_per_round: int | None = PER_ROUND,
    rounds: int = ROUNDS,
    eval_every: int = EVAL_EVERY,
    partition: str = PARTITION,
    alpha: float = ALPHA,
    peft: str = PEFT,
    rank: int = RANK,
    prompt_length: int = PROMPT_LENGTH,
    num_seeds: int = typer.Option(4096, help="K: shared seed pool; up- and download are K floats (16 KiB)."),
    local_steps: int = typer.Option(20, help="tau: MeZO steps per client per round (paper: 200)."),
    eps: float = typer.Option(5e-4, help="Finite-difference step (paper: 5e-4)."),
    lr: float = typer.Option(5e-3, help="Learning rate of each (seed, scalar) step."),
    batch_size: int = BATCH,
    pro: bool = typer.Option(False, help="FedKSeed-Pro: sample seeds by the magnitude of their history."),
    seed: int = SEED,
    low_memory: bool = LOW_MEMORY,
    model: str | None = MODEL,
    head: str = HEAD,
    device: str = DEVICE,
    dtype: str = DTYPE,
    max_length: int = MAX_LENGTH,
    out: str = OUT,
    resume: str | None = RESUME,
) -> None:
    """FedKSeed: MeZO steps on K shared seeds; only K scalars go up and down; clients rebuild weights by replay."""
    from bbfl.experiment import FederatedDataConfig
    from bbfl.federation.engine import EngineConfig
    from bbfl.methods.fedkseed import FedKSeedConfig

    task, rounds = _resumed("fedkseed", resume, task, rounds)
    try:
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
        )
        method_cfg = FedKSeedConfig(
            peft=peft,
            rank=rank,
            alpha=2.0 * rank,
            prompt_length=prompt_length,
            num_seeds=num_seeds,
            local_steps=local_steps,
            eps=eps,
            lr=lr,
            batch_size=batch_size,
            pro=pro,
            seed=seed,
        )
        engine_cfg = EngineConfig(
            rounds=rounds, clients_per_round=clients_per_round, eval_every=eval_every, seed=method_cfg.seed
        )
        bb_cfg = _blackbox(model, head, device, dtype, max_length, low_memory)
        run, records = _run("fedkseed", data_cfg, method_cfg, engine_cfg, bb_cfg, out, resume)
    except BBFLError as exc:
        fail(exc)
    _summary("FedKSeed", task, run, records)
