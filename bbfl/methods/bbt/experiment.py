"""BBT end to end: few-shot data -> black box -> zero-shot, BBT (and white-box) -> run directory.

>>> # python -c "from bbfl.methods.bbt import run_bbt_experiment; ..."  (see examples/bbt_sst2.py)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from bbfl.blackbox.placement import prompt_origin
from bbfl.exceptions import ConfigError
from bbfl.experiment import (
    BlackBoxConfig,
    DataConfig,
    data_config_from_run,
    data_record,
    load_data_task,
    open_for_resume,
    prepare_data,
    recorded_model_name,
    scored_test,
    with_recorded_task,
)
from bbfl.methods.bbt.config import BBTConfig
from bbfl.methods.bbt.method import SubspaceProjection, checkpoint_history, evaluate_prompt, run_bbt
from bbfl.methods.prompt_tuning import PromptTuningConfig, tune_prompt_whitebox
from bbfl.report import RunDir, save_arrays


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
