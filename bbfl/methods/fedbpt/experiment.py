"""FedBPT end to end on the in-process engine (and the builder Flower's apps use), plus FedBPT scored on
ZooPFL's federation (ZooPFL's non-personalised baselines)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bbfl.blackbox.placement import prompt_origin
from bbfl.experiment import (
    BlackBoxConfig,
    FederatedDataConfig,
    PersonalDataConfig,
    data_config_from_run,
    data_record,
    federate,
    open_for_resume,
    plot_federated,
    prepare_federated_data,
    prepare_personal_data,
    recorded_model_name,
)
from bbfl.federation.contract import ClientClock, FederatedMethod
from bbfl.federation.engine import EngineConfig
from bbfl.methods.bbt import SubspaceProjection, evaluate_prompt
from bbfl.methods.fedbpt.config import FedBPTConfig
from bbfl.methods.zoopfl.config import ZooPFLConfig
from bbfl.report import RunDir, save_arrays


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
    score_zero_shot: bool = True,
) -> tuple[RunDir, list[dict]]:
    """FedBPT on the in-process engine; checkpoints every round; ``resume`` continues a run directory.

    ``score_zero_shot=False`` skips the final no-prompt test pass (one more pass over the test set) for
    callers that run many settings on the same test set and score zero-shot once themselves.
    """
    if resume is not None:
        run = open_for_resume(resume)
        data_cfg, fed_cfg, engine_cfg, bb_cfg = _configs_of_run(run.config)
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
        _warn_if_rank_weights_favour_small_clients(fed_cfg, config["client_sizes"])
    if on_run is not None:
        on_run(run)
    method = fedbpt_method(fed_cfg, engine_cfg, blackbox, task, client_splits, test)
    projection, p0 = method.projection, method.projection.p0
    records = federate(run, method, engine_cfg, on_round, stop_after)
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
        zero_shot = evaluate_prompt(blackbox, None, method.test)[0] if score_zero_shot else None
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
        plot_federated(run, "FedBPT", {"zero-shot (no prompt)": zero_shot} if score_zero_shot else {})
    return run, records


def _warn_if_rank_weights_favour_small_clients(cfg: FedBPTConfig, sizes: list[int]) -> None:
    """Once, when a run starts (not on resume, not in every Flower process that rebuilds the method)."""
    if cfg.aggregation == "fedbpt" and cfg.perturb_rate == 0 and max(sizes) >= 4 * max(1, min(sizes)):
        # measured in the README (FedBPT results): with the plain loss the server's rank weights go to the
        # clients with the lowest loss on their *own* data, i.e. the smallest, overfitted ones, under
        # Dirichlet splits; the paper's fitness ratio tempers them
        logging.getLogger("bbfl.federation").warning(
            "client sizes range from %d to %d examples: FedBPT's server ranks clients by the loss on their own "
            "data, and with --perturb-rate 0 the smallest clients lead its update; the paper's fitness ratio "
            "(--perturb-rate 0.5) or --aggregation fedavg (weights clients by examples) avoids that",
            min(sizes),
            max(sizes),
        )


def fedbpt_method(fed_cfg, engine_cfg, blackbox, task, client_splits, test):
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
    method = fedbpt_method(fed_cfg, engine_cfg, blackbox, task, trains, test)
    clock = ClientClock(method, blackbox)
    records = federate(run, method, engine_cfg, on_round, None)
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


def fedbpt_from_config(config: dict) -> tuple[FederatedMethod, EngineConfig]:
    """(FedBPT, engine config) from a fedbpt run's ``config.json`` contents - what Flower's apps build."""
    data_cfg, fed_cfg, engine_cfg, bb_cfg = _configs_of_run(config)
    task, splits, test = prepare_federated_data(data_cfg, fed_cfg.seed)
    return fedbpt_method(fed_cfg, engine_cfg, bb_cfg.build(), task, splits, test), engine_cfg


def _configs_of_run(config: dict) -> tuple[FederatedDataConfig, FedBPTConfig, EngineConfig, BlackBoxConfig]:
    """The settings a fedbpt run's config.json records: what a resume and Flower's apps rebuild it from."""
    return (
        data_config_from_run(config, FederatedDataConfig),
        FedBPTConfig(**config["fedbpt"]),
        EngineConfig(**config["engine"]),
        BlackBoxConfig.from_saved(config["blackbox"]),
    )
