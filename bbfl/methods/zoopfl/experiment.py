"""ZooPFL end to end on the in-process engine: global and personalised accuracy per round (and the
builder Flower's apps use)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from bbfl.experiment import (
    BlackBoxConfig,
    PersonalDataConfig,
    data_config_from_run,
    data_record,
    federate,
    open_for_resume,
    plot_federated,
    prepare_personal_data,
)
from bbfl.federation.contract import FederatedMethod
from bbfl.federation.engine import EngineConfig
from bbfl.methods.bbt import evaluate_prompt
from bbfl.methods.zoopfl.config import ZooPFLConfig
from bbfl.report import RunDir


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
        data_cfg, zoo_cfg, engine_cfg, bb_cfg = _configs_of_run(run.config)
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
    method = zoopfl_method(zoo_cfg, blackbox, task, trains, tests, test)
    records = federate(run, method, engine_cfg, on_round, stop_after)
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
        plot_federated(run, "ZooPFL", zero_shot, ("test_accuracy", "personal_accuracy"))
    return run, records


def zoopfl_method(zoo_cfg, blackbox, task, trains, tests, test):
    from bbfl.methods.zoopfl import ZooPFL

    encode = [blackbox.encode(task, s) for s in trains], [blackbox.encode(task, s) for s in tests]
    return ZooPFL(zoo_cfg, blackbox, *encode, blackbox.encode(task, test), task.num_classes)


def zoopfl_from_config(config: dict) -> tuple[FederatedMethod, EngineConfig]:
    """(ZooPFL, engine config) from a zoopfl run's ``config.json`` contents - what Flower's apps build."""
    data_cfg, zoo_cfg, engine_cfg, bb_cfg = _configs_of_run(config)
    task, trains, tests, test = prepare_personal_data(data_cfg, zoo_cfg.seed)
    return zoopfl_method(zoo_cfg, bb_cfg.build(), task, trains, tests, test), engine_cfg


def _configs_of_run(config: dict) -> tuple[PersonalDataConfig, ZooPFLConfig, EngineConfig, BlackBoxConfig]:
    """The settings a zoopfl run's config.json records: what a resume and Flower's apps rebuild it from."""
    return (
        data_config_from_run(config, PersonalDataConfig),
        ZooPFLConfig(**config["zoopfl"]),
        EngineConfig(**config["engine"]),
        BlackBoxConfig.from_saved(config["blackbox"]),
    )
