"""Forward-only PEFT end to end - FwdLLM and FedKSeed share it - on the in-process engine (and the builder
Flower's apps use): per-round accuracy, bytes and peak memory, the tuned weights in peft.safetensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bbfl.experiment import (
    BlackBoxConfig,
    FederatedDataConfig,
    data_config_from_run,
    data_record,
    federate,
    open_for_resume,
    plot_federated,
    prepare_federated_data,
    recorded_model_name,
)
from bbfl.federation.contract import FederatedMethod
from bbfl.federation.engine import EngineConfig
from bbfl.report import RunDir, save_arrays

if TYPE_CHECKING:
    from bbfl.methods.fedkseed import FedKSeedConfig
    from bbfl.methods.fwdllm import FwdLLMConfig

# ---------------------------------------------------------------------- forward-only PEFT (FwdLLM, FedKSeed)
FORWARD_METHODS = ("fwdllm", "fedkseed")


def forward_config(name: str, saved: dict):
    from bbfl.methods.fedkseed import FedKSeedConfig
    from bbfl.methods.fwdllm import FwdLLMConfig

    return (FwdLLMConfig if name == "fwdllm" else FedKSeedConfig)(**saved)


def forward_blackbox(bb_cfg: BlackBoxConfig, peft: str) -> BlackBoxConfig:
    # weight deltas act inside the layers: the plain forward (no prefix shortcut) unless tuning a prompt
    if bb_cfg.prompt_attention == "auto" and peft != "prompt":
        return replace(bb_cfg, prompt_attention="full")
    return bb_cfg


def forward_method(name: str, cfg, engine_cfg: EngineConfig, blackbox, task, client_splits, test):
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
        data_cfg, method_cfg, engine_cfg, bb_cfg = _configs_of_run(name, run.config)
    bb_cfg = forward_blackbox(bb_cfg, method_cfg.peft)
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
    method = forward_method(name, method_cfg, engine_cfg, blackbox, task, client_splits, test)
    records = federate(run, method, engine_cfg, on_round, stop_after)
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
        plot_federated(run, name, {"round 0 (untuned weights)": records[0]["test_accuracy"]})
    return run, records


def forward_from_config(config: dict) -> tuple[FederatedMethod, EngineConfig]:
    """(FwdLLM or FedKSeed, engine config) from such a run's ``config.json`` contents - what Flower's apps build."""
    name = config["method"]
    data_cfg, cfg, engine_cfg, bb_cfg = _configs_of_run(name, config)
    task, splits, test = prepare_federated_data(data_cfg, cfg.seed)
    blackbox = forward_blackbox(bb_cfg, cfg.peft).build()
    return forward_method(name, cfg, engine_cfg, blackbox, task, splits, test), engine_cfg


def _configs_of_run(
    name: str, config: dict
) -> tuple[FederatedDataConfig, FwdLLMConfig | FedKSeedConfig, EngineConfig, BlackBoxConfig]:
    """The settings a fwdllm / fedkseed run's config.json records: what a resume and Flower's apps rebuild it from."""
    return (
        data_config_from_run(config, FederatedDataConfig),
        forward_config(name, config[name]),
        EngineConfig(**config["engine"]),
        BlackBoxConfig.from_saved(config["blackbox"]),
    )
