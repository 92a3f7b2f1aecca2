"""BDPL and FedOne end to end through an OpenAI-compatible API, and FedOne from a run's record (Flower's apps).

:func:`run_bdpl_experiment` and :func:`run_fedone_experiment`: few-shot data -> the black box of an
:class:`EndpointConfig` -> zero-shot -> the method -> run directory. Every query is paid for: a run's plan
(training + evaluations) must fit the budget before any request, and the black box refuses any query past it.
The API key is used for requests only and never written anywhere (config.json says whether one was given).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bbfl.exceptions import ConfigError, DataError
from bbfl.experiment import (
    DataConfig,
    FederatedDataConfig,
    data_config_from_run,
    data_record,
    open_for_resume,
    prepare_data,
    prepare_federated_data,
)
from bbfl.federation.contract import FederatedMethod
from bbfl.federation.engine import EngineConfig, run_federation
from bbfl.io import load_arrays
from bbfl.methods.bdpl.config import BDPLConfig
from bbfl.methods.bdpl.method import FedOne, candidate_vocab, fedone_plan, fedone_round_queries, prompt_text, run_bdpl
from bbfl.methods.losses import accuracy
from bbfl.report import RunDir

if TYPE_CHECKING:
    from bbfl.blackbox.openai import OpenAIBlackBox


@dataclass
class EndpointConfig:
    """An OpenAI-compatible endpoint; ``budget``: cap on API queries (None: the plan), ``api_key``: or the env's."""

    base_url: str | None = None
    api_key: str | None = None
    model: str = "default"
    scoring: str = "auto"
    budget: int | None = None
    cache_dir: str | None = None
    concurrency: int = 4
    top_logprobs: int = 20
    mask_text: str = "[MASK]"

    def checked(self) -> EndpointConfig:
        """This endpoint with its URL's trailing slash dropped, once URL, concurrency and budget are checked."""
        if not self.base_url:
            raise ConfigError("--base-url is required (an OpenAI-compatible API root such as http://127.0.0.1:8000/v1)")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if self.concurrency < 1:
            raise ConfigError(f"--concurrency should be >= 1, got {self.concurrency}")
        if self.budget is not None and self.budget < 1:
            raise ConfigError(f"--budget should be >= 1, got {self.budget}")
        return replace(self, base_url=self.base_url.rstrip("/"))

    def resumed(self, saved: dict) -> EndpointConfig:
        """For a resumed run: its ``blackbox`` record's model, scoring, budget (URL and cache unless given)."""
        endpoint = replace(self, base_url=self.base_url or saved["base_url"], budget=None).checked()
        kept = {k: saved[k] for k in ("model", "scoring", "top_logprobs", "mask_text")}
        cache_dir = self.cache_dir or saved.get("cache_dir")
        return replace(endpoint, **kept, budget=int(saved["budget"]), cache_dir=cache_dir)

    def blackbox(self, budget: int) -> OpenAIBlackBox:
        """The black box on this endpoint, allowed ``budget`` queries (a resumed run's: what is left)."""
        from bbfl.blackbox.openai import OpenAIBlackBox

        return OpenAIBlackBox(**{**asdict(self), "budget": budget})  # the fields are its arguments

    def record(self, bb: Any) -> dict:
        """The black box's settings for config.json: whether a key was given, never the key."""
        given = bool(self.api_key) or bool(os.environ.get("OPENAI_API_KEY"))
        # absolute: a resume from elsewhere and Flower's app processes (`bbfl flower-local`) find the same cache
        cache = str(Path(self.cache_dir).resolve()) if self.cache_dir else None
        return {**bb.record(), "api_key_given": given, "cache_dir": cache, "concurrency": self.concurrency}


@dataclass
class APIRunResult:
    """What a BDPL or FedOne run hands back (its API cost as table rows: ``cost_rows(result.summary["cost"])``)."""

    run: RunDir
    summary: dict  # summary.json's content: rows, prompt, cost, budget, scoring...
    base_url: str  # the API root it queried (a resumed run: the one given then, else its own)


def bdpl_plan(train_queries: int, samples: int, eval_every: int) -> int:
    """Dev checks `run_bdpl` will make for a training budget (its schedule, replayed on integers)."""
    queries, next_eval, checks = 0, eval_every, 0
    while queries + samples <= train_queries:
        queries += samples
        if queries >= next_eval or queries + samples > train_queries:
            checks += 1
            next_eval += eval_every * max(1, (queries - next_eval) // eval_every + 1)
    return checks


COSTS = {  # the black box's cost() counters a run adds up, and their names in the CLI's table
    "queries": "API queries (prompt x batch)",
    "requests": "HTTP requests (retries included)",
    "cache_hits": "cache hits",
    "retries": "retries",
    "prompt_tokens": "prompt tokens",
    "completion_tokens": "completion tokens",
}


def cost_rows(cost: dict) -> list[dict]:
    """A run's API cost as (metric, value) table rows."""
    return [{"metric": label, "value": cost.get(key, 0)} for key, label in COSTS.items()]


def _add_costs(before: dict, now: dict) -> dict:
    return {k: int(before.get(k, 0)) + int(now.get(k, 0)) for k in COSTS}


def _fit_budget(endpoint: EndpointConfig, plan: int, why: str, lower: str) -> EndpointConfig:
    """The endpoint with its budget set (the plan unless one was given); a budget below the plan is refused."""
    if endpoint.budget is not None and plan > endpoint.budget:
        raise ConfigError(
            f"this run needs {plan} API queries ({why}) > --budget {endpoint.budget}; lower {lower} or raise --budget"
        )
    return replace(endpoint, budget=endpoint.budget or plan)


def run_bdpl_experiment(
    data_cfg: DataConfig | None,
    cfg: BDPLConfig | None,
    endpoint: EndpointConfig,
    out_root: str | Path = "runs",
    resume: str | Path | None = None,
    on_zero_shot: Callable[[dict], None] | None = None,
    on_step: Callable[[dict], None] | None = None,
    on_run: Callable[[RunDir], None] | None = None,
) -> APIRunResult:
    """BDPL: zero-shot on test and dev, ``cfg.budget // cfg.samples`` steps with dev checks, the prompt on test.

    ``resume`` continues a run from its checkpoint with its own settings (the configs given are ignored). ``on_run``
    gets the run directory once it exists, ``on_zero_shot`` ``{test_accuracy, dev_accuracy, scoring, steps}``
    before the first step, ``on_step`` each step's record once logged."""
    if resume is not None:  # the saved run's settings win; only the endpoint and the key come from the caller
        run = open_for_resume(resume)
        saved = run.config
        if saved.get("method") != "bdpl":
            raise ConfigError(f"{resume} is not a bdpl run directory")
        data_cfg, cfg = data_config_from_run(saved), BDPLConfig(**saved["bdpl"])
        steps, plan = int(saved["steps"]), int(saved["planned_queries"])
        endpoint = endpoint.resumed(saved["blackbox"])
    else:
        endpoint, steps = endpoint.checked(), cfg.budget // cfg.samples
        # zero-shot on test and dev, the dev checks, the final prompt on test
        plan = cfg.budget + bdpl_plan(cfg.budget, cfg.samples, cfg.eval_every) + 3
        why = f"{steps} steps x {cfg.samples} samples + evaluations"
        endpoint = _fit_budget(endpoint, plan, why, "--steps/--samples")
    task, train, dev, test = prepare_data(data_cfg, cfg.seed)
    vocab = candidate_vocab(train.texts, cfg.num_candidates)
    loss_name = task.loss if cfg.loss == "auto" else cfg.loss
    zero, previous = _bdpl_resume_state(run) if resume is not None else ([], {})
    bb = endpoint.blackbox(endpoint.budget - previous.get("queries", 0))
    if resume is None:
        config = {
            "method": "bdpl",
            "data": data_cfg.record(),
            "bdpl": cfg.to_dict(),
            "steps": steps,
            "planned_queries": plan,
            "blackbox": endpoint.record(bb),
            "sizes": {"train": len(train), "dev": len(dev), "test": len(test)},
            "vocab": vocab,
            **data_record(task, test),
        }
        run = RunDir.create(out_root, f"bdpl-{task.name}", config)
    if on_run is not None:
        on_run(run)
    train_e, dev_e, test_e = (bb.encode(task, s) for s in (train, dev, test))
    if zero:
        zs_test, zs_dev = float(zero[0]["test_accuracy"]), float(zero[0]["dev_accuracy"])
    else:
        zs_test = float(accuracy(bb.logits(None, test_e), test_e.labels)[0])
        zs_dev = float(accuracy(bb.logits(None, dev_e), dev_e.labels)[0])
        record = {"phase": "zero-shot", "test_accuracy": zs_test, "dev_accuracy": zs_dev}
        run.log({**record, "api": _add_costs(previous, bb.cost())}, front=True)
    if on_zero_shot is not None:
        on_zero_shot({"test_accuracy": zs_test, "dev_accuracy": zs_dev, "scoring": bb.scoring, "steps": steps})

    def log_step(record: dict) -> None:
        run.log({"phase": "bdpl", **record, "api": _add_costs(previous, bb.cost())})
        if on_step is not None:
            on_step(record)

    result = run_bdpl(cfg, bb, train_e, dev_e, vocab, loss_name, log_step, run.path / "checkpoint.safetensors")
    test_acc = float(accuracy(bb.logits([result.prompt], test_e), test_e.labels)[0])
    cost = _add_costs(previous, bb.cost())
    rows = [
        {"method": "zero-shot (no prompt)", "test_acc": zs_test, "dev_acc": zs_dev, "train_queries": 0},
        {"method": "bdpl", "test_acc": test_acc, "dev_acc": result.dev_accuracy, "train_queries": result.train_queries},
    ]
    run.log({"phase": "bdpl-final", "test_accuracy": test_acc, "prompt": result.prompt, "api": cost})
    summary = {
        "task": task.name,
        "rows": rows,
        "prompt": result.prompt,
        "last_most_likely_prompt": prompt_text(result.probs.argmax(axis=1), vocab),
        "cost": cost,
        "budget": int(run.config["blackbox"]["budget"]),
        "scoring": bb.scoring,
    }
    run.write_summary(summary)
    run.plot("queries", ["train_loss", "train_loss_mean"], "bdpl_loss.png", "BDPL training loss", where="bdpl")
    run.plot("queries", ["dev_accuracy", "best_dev_accuracy"], "bdpl_accuracy.png", "BDPL dev accuracy", where="bdpl")
    return APIRunResult(run, summary, endpoint.base_url)


def _bdpl_resume_state(run: RunDir) -> tuple[list[dict], dict]:
    """(the logged zero-shot record, the API cost so far), with metrics.jsonl rebuilt from the checkpoint."""
    checkpoint = run.path / "checkpoint.safetensors"
    metrics = run.metrics()
    zero = [r for r in metrics if r.get("phase") == "zero-shot"]
    history = json.loads(load_arrays(checkpoint)[1]["bdpl"])["history"] if checkpoint.is_file() else []
    logged = {r["step"]: r for r in metrics if r.get("phase") == "bdpl"}
    steps = [logged.get(h["step"], {"phase": "bdpl", **h}) for h in history]  # a step the crash did not log
    run.rewrite_metrics(zero + steps)  # drops a finished run's final record: it is scored again
    train = history[-1]["queries"] if history else 0
    spent = 2 * bool(zero) + train + sum("dev_accuracy" in h for h in history)
    return zero, {**([r for r in run.metrics() if "api" in r] or [{"api": {}}])[-1]["api"], "queries": spent}


def run_fedone_experiment(
    data_cfg: FederatedDataConfig | None,
    cfg: BDPLConfig | None,
    engine_cfg: EngineConfig | None,
    endpoint: EndpointConfig,
    out_root: str | Path = "runs",
    resume: str | Path | None = None,
    on_zero_shot: Callable[[dict], None] | None = None,
    on_round: Callable[[dict], None] | None = None,
    on_run: Callable[[RunDir], None] | None = None,
) -> APIRunResult:
    """FedOne on the in-process engine (a checkpoint every round): zero-shot, then the rounds.

    ``resume`` continues a run from its last round with its own settings (the configs given are ignored). ``on_run``
    gets the run directory once it exists, ``on_zero_shot`` ``{test_accuracy, scoring, rounds, done_rounds}``
    before round 0, ``on_round`` each round's record (with its ``api`` cost) once logged."""
    if resume is not None:  # the saved run's settings win; only the endpoint and the key come from the caller
        run = open_for_resume(resume)
        saved = run.config
        if saved.get("method") != "fedone":
            raise ConfigError(f"{resume} is not a fedone run directory")
        data_cfg, cfg = data_config_from_run(saved, FederatedDataConfig), BDPLConfig(**saved["bdpl"])
        engine_cfg, plan = EngineConfig(**saved["engine"]), int(saved["planned_queries"])
        endpoint = endpoint.resumed(saved["blackbox"])
    else:
        endpoint, rounds = endpoint.checked(), engine_cfg.rounds
        active = engine_cfg.clients_per_round or data_cfg.num_clients
        # zero-shot + round 0's evaluation, then per round: the active clients' steps + one evaluation
        plan = fedone_plan(cfg, rounds, active)  # also checked when Flower builds the run
        why = f"{rounds} rounds x {fedone_round_queries(cfg, active)}, evaluations included"
        endpoint = _fit_budget(endpoint, plan, why, "--rounds/--samples/--local-steps")
    task, client_splits, test = prepare_federated_data(data_cfg, cfg.seed)
    if any(len(s) == 0 for s in client_splits):
        raise ConfigError("a client received no examples: raise --k-shot or lower --clients")
    vocab = candidate_vocab([t for s in client_splits for t in s.texts], cfg.num_candidates)
    loss_name = task.loss if cfg.loss == "auto" else cfg.loss
    done_rounds, previous = _fedone_resume_state(run, cfg, engine_cfg) if resume is not None else (0, {})
    bb = endpoint.blackbox(endpoint.budget - previous.get("queries", 0))
    if resume is None:
        config = {
            "method": "fedone",
            "data": data_cfg.record(),
            "bdpl": cfg.to_dict(),
            "engine": asdict(engine_cfg),
            "planned_queries": plan,
            "blackbox": endpoint.record(bb),
            "client_sizes": [len(s) for s in client_splits],
            "vocab": vocab,
            **data_record(task, test),
        }
        run = RunDir.create(out_root, f"fedone-{task.name}", config)
    if on_run is not None:
        on_run(run)
    test_e = bb.encode(task, test)
    zero = [r for r in run.metrics() if r.get("phase") == "zero-shot"]
    if zero:
        zs_test = float(zero[0]["test_accuracy"])
    else:
        zs_test = float(accuracy(bb.logits(None, test_e), test_e.labels)[0])
        run.log({"phase": "zero-shot", "test_accuracy": zs_test, "api": bb.cost()}, front=True)
    if on_zero_shot is not None:
        info = {"test_accuracy": zs_test, "scoring": bb.scoring, "rounds": engine_cfg.rounds}
        on_zero_shot({**info, "done_rounds": done_rounds})
    method = FedOne(cfg, bb, [bb.encode(task, s) for s in client_splits], test_e, vocab, loss_name)
    done = {r["round"] for r in run.metrics() if r.get("phase") == "round"}

    def log_round(record: dict) -> None:
        record["api"] = _add_costs(previous, bb.cost())
        if record["round"] not in done:
            run.log({"phase": "round", **record})
        if on_round is not None:
            on_round(record)

    records = run_federation(method, engine_cfg, run.path, log_round)
    last = records[-1]
    cost = _add_costs(previous, bb.cost())
    start = records[0].get("test_accuracy", float("nan"))
    rows = [
        {"method": "zero-shot (no prompt)", "test_acc": zs_test, "train_queries": 0},
        {"method": "fedone start (round 0)", "test_acc": start, "train_queries": 0},
        {"method": "fedone", "test_acc": last["test_accuracy"], "train_queries": last["train_queries"]},
    ]
    summary = {
        "task": task.name,
        "rows": rows,
        "prompt": last["prompt"],
        "rounds": last["round"],
        "clients": data_cfg.num_clients,
        "clients_per_round": engine_cfg.clients_per_round,
        "cost": cost,
        "budget": endpoint.budget,
        "scoring": bb.scoring,
    }
    run.write_summary(summary)
    run.plot("round", ["test_accuracy"], "fedone_accuracy.png", "FedOne global test accuracy", where="round")
    run.plot("train_queries", ["test_accuracy"], "accuracy_vs_queries.png", "accuracy vs. queries", where="round")
    return APIRunResult(run, summary, endpoint.base_url)


def _fedone_resume_state(run: RunDir, cfg: BDPLConfig, engine_cfg: EngineConfig) -> tuple[int, dict]:
    """(the last round the engine's checkpoint declares done (0 if none), the API cost so far)."""
    ckpt = run.path / "server_state.safetensors"
    done_rounds = int(json.loads(load_arrays(ckpt)[1]["engine"])["round"]) if ckpt.is_file() else 0
    logged = [r for r in run.metrics() if r.get("phase") == "round"]
    previous = logged[-1].get("api", {}) if logged else {}
    zero_logged = any(r.get("phase") == "zero-shot" for r in run.metrics())
    per_round = fedone_round_queries(cfg, engine_cfg.clients_per_round)
    spent = int(zero_logged) + (1 + done_rounds * per_round if done_rounds else 0)
    return done_rounds, {**previous, "queries": spent}  # the plan's count: exact (no drop-outs in FedOne runs)


def openai_blackbox_from_record(saved: dict) -> OpenAIBlackBox:
    """The OpenAIBlackBox a run's config.json describes (``bbfl fedone``'s ``blackbox`` record).

    The key is read from ``$OPENAI_API_KEY`` of the process that builds it (each Flower SuperNode and the
    ServerApp): config.json only says whether the run had one, and none is ever written anywhere.
    """
    from bbfl.blackbox.openai import OpenAIBlackBox

    if saved.get("api_key_given") and not os.environ.get("OPENAI_API_KEY"):
        raise ConfigError(
            f"this run used an API key for {saved.get('base_url')}: set $OPENAI_API_KEY in the environment of "
            "every process that builds it (on Flower: the SuperLink's and each SuperNode's)"
        )
    return OpenAIBlackBox(
        saved["model"],
        base_url=saved["base_url"],
        scoring=saved["scoring"],  # resolved when the run started: no probing here
        verify=False,
        budget=saved["budget"],
        top_logprobs=saved["top_logprobs"],
        label_floor=saved["label_floor"],
        mask_text=saved["mask_text"],
        instruction=saved["instruction"],
        concurrency=saved.get("concurrency", 4),
        # shared by every process of a run on one host: entries are written atomically (temp + rename)
        cache_dir=saved.get("cache_dir"),
    )


def fedone_from_config(config: dict) -> tuple[FederatedMethod, EngineConfig]:
    """FedOne from ``bbfl fedone``'s config.json: the data, vocabulary and black box of that run."""
    engine_cfg = EngineConfig(**config["engine"])
    data_cfg, cfg = data_config_from_run(config, FederatedDataConfig), BDPLConfig(**config["bdpl"])
    check_fedone_budget(cfg, engine_cfg, data_cfg.num_clients, int(config["blackbox"]["budget"]))
    task, splits, test = prepare_federated_data(data_cfg, cfg.seed)
    if any(len(s) == 0 for s in splits):
        raise DataError("a FedOne client received no examples: raise k_shot or lower num_clients")
    # the saved vocabulary: a prompt index must name the same word on the server and on every SuperNode
    vocab = config.get("vocab") or candidate_vocab([t for s in splits for t in s.texts], cfg.num_candidates)
    blackbox = openai_blackbox_from_record(config["blackbox"])
    loss_name = task.loss if cfg.loss == "auto" else cfg.loss
    clients = [blackbox.encode(task, s) for s in splits]
    return FedOne(cfg, blackbox, clients, blackbox.encode(task, test), vocab, loss_name), engine_cfg


def check_fedone_budget(cfg: BDPLConfig, engine_cfg: EngineConfig, num_clients: int, budget: int) -> None:
    """A FedOne run's rounds must fit its query budget (ConfigError), e.g. `bbfl flower-local --rounds N`."""
    plan = fedone_plan(cfg, engine_cfg.rounds, engine_cfg.clients_per_round or num_clients)
    if plan > budget:
        raise ConfigError(
            f"{engine_cfg.rounds} FedOne rounds need {plan} API queries > the run's budget {budget}; "
            "lower the rounds or start a run with a larger --budget"
        )
