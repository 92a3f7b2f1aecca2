"""ZooPFL vs. its baselines on real data with strongly non-IID clients: personalised accuracy on each client's own test.

All settings of one seed use exactly the same clients, Dirichlet partition and per-client (train, test)
splits (`bbfl.experiment.prepare_personal_data`, ZooPFL's), and each runs in a fresh process so that its
peak memory is its own.

  ZooPFL (round 0 of every run is its untrained starting point):
    both          surgery + re-mapping, federated
    surgery       surgery only
    remap         re-mapping only (the black box's scores under the untrained surgery, re-mapped per client)
    local         both, no federation: local-only training
  Baselines:
    fedbpt        FedBPT (--fedbpt-* settings, the same --rounds) on the clients' train splits; its final
                  global prompt scored on each client's own test split
    fedbpt-remap  that global prompt through each client's private re-mapping (ZooPFL's layer and the
                  re-mapping-only schedule over --rounds rounds), fitted on the client's own train split
    zero-shot     no prompt at all
  fedbpt and fedbpt-remap share one FedBPT run. The FedBPT defaults spend 8 x 5 + 1 = 41 queries per
  client-round, about ZooPFL's 5 x (8 + 1) = 45.

Reported per setting: personalised accuracy as ZooPFL defines it (correct / test examples over all
clients, i.e. client accuracies weighted by test size), the worst client's and the unweighted client
mean; the global test accuracy; the start (round 0 / z = 0) personalised accuracy; queries per client
step (a ZO step or one CMA-ES generation) and per client-round; bytes per client-round and per round;
and the clients' cost:
  * client s / round: wall-clock of the client updates per client-round (the simulated clients run one
    after another in one process). `seconds_per_client_round` is the older, coarser measure: whole
    rounds, server evaluation included, per client-round.
  * its split: inside the black box's calls / fitting the re-mapping / the rest, which is the surgery's
    local work for ZooPFL (encoder forward and backward, pre-training, Adam, decoding the prompts) and
    CMA-ES plus the projection for FedBPT. fedbpt-remap adds its one-off re-mapping (one query per
    client to score its train split, then the fit) to FedBPT's client time.
  * peak RSS (MB) of the setting's process: the model, the server, evaluation and all simulated clients
    together - an upper bound on one client's. The zero-shot row (model + scoring only) is the floor;
    what a client would hold beyond the model is not measured on its own.
Results are appended to a JSON-lines file as runs finish.

    python benchmarks/zoopfl_accuracy.py --task sst2 --data-dir ../shared/data/sst2 --alpha 0.5 --k-shot 150 \
        --settings both surgery remap local fedbpt fedbpt-remap zero-shot --seeds 13
    python benchmarks/zoopfl_accuracy.py --table zoopfl_results.jsonl
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ZOOPFL_SETTINGS = {
    "both": {},
    "surgery": {"remap": False},
    "remap": {"surgery": False},
    "local": {"federate": False},
}
FEDBPT_SETTINGS = ("fedbpt", "fedbpt-remap")
SETTINGS = [*ZOOPFL_SETTINGS, *FEDBPT_SETTINGS, "zero-shot"]


def _data(args):
    from bbfl.experiment import PersonalDataConfig

    return PersonalDataConfig(
        task=args.task,
        data_dir=args.data_dir,
        k_shot=args.k_shot,
        test_limit=args.test_limit,
        num_clients=args.clients,
        partition="dirichlet",
        alpha=args.alpha,
        client_test_fraction=args.client_test_fraction,
    )


def _zoopfl_config(args, seed: int, **overrides):
    from bbfl.methods.zoopfl import ZooPFLConfig

    return ZooPFLConfig(local_steps=args.local_steps, zo_queries=args.zo_queries, seed=seed, **overrides)


def _shares(total: float, blackbox: float, remap: float) -> dict:
    total = max(total, 1e-12)
    return {
        "blackbox_share": blackbox / total,
        "remap_share": remap / total,
        "other_share": 1 - (blackbox + remap) / total,
    }


def _traffic(records: list[dict]) -> dict:
    last = records[-1]
    return {
        "bytes_up": last["bytes_up_per_client"],
        "bytes_down": last["bytes_down_per_client"],
        "bytes_per_round": statistics.mean(r["bytes_total"] for r in records[1:]),
        "seconds_per_client_round": sum(r["seconds"] for r in records[1:])
        / max(1, sum(len(r["aggregated"]) for r in records[1:])),
    }


def run_zoopfl(args, seed: int, setting: str) -> list[dict]:
    from bbfl.experiment import BlackBoxConfig
    from bbfl.federation.engine import EngineConfig
    from bbfl.methods.zoopfl.experiment import run_zoopfl_experiment

    cfg = _zoopfl_config(args, seed, **ZOOPFL_SETTINGS[setting])
    bb = BlackBoxConfig(max_length=args.max_length)
    start = time.perf_counter()
    run, records = run_zoopfl_experiment(
        _data(args), cfg, EngineConfig(rounds=args.rounds, seed=seed), bb, tempfile.mkdtemp(prefix="bbfl-zoo-")
    )
    first, last = records[0], records[-1]
    client_rounds = max(1, sum(len(r["aggregated"]) for r in records[1:]))
    return [
        {
            "setting": setting,
            "personal_acc": last["personal_accuracy"],
            "personal_acc_min": last["personal_accuracy_min"],
            "personal_acc_client_mean": last["personal_accuracy_client_mean"],
            "zero_shot_personal_acc": first["personal_accuracy"],  # round 0: the untrained surgery
            "global_acc": last["test_accuracy"],
            "queries_per_client_step": cfg.zo_queries + 1 if cfg.surgery else 1 / cfg.local_steps,
            "queries_per_client_round": cfg.local_steps * (cfg.zo_queries + 1) if cfg.surgery else 1,
            "train_queries": last["train_queries"],
            **_traffic(records),
            "client_seconds_per_round": last["client_seconds"] / client_rounds,
            **_shares(last["client_seconds"], last["client_blackbox_seconds"], last["client_remap_seconds"]),
            "seconds": time.perf_counter() - start,
            "run_dir": str(run.path),
        }
    ]


def run_fedbpt(args, seed: int, settings: list[str]) -> list[dict]:
    """The rows of ``fedbpt`` and/or ``fedbpt-remap`` from one FedBPT run."""
    from bbfl.experiment import BlackBoxConfig
    from bbfl.federation.engine import EngineConfig
    from bbfl.methods.fedbpt import FedBPTConfig
    from bbfl.methods.fedbpt.experiment import run_fedbpt_personal_experiment

    fed = FedBPTConfig(
        intrinsic_dim=args.fedbpt_dim,
        prompt_length=args.fedbpt_prompt_length,
        local_popsize=args.fedbpt_popsize,
        local_iter=args.fedbpt_local_iter,
        seed=seed,
    )
    remap = _zoopfl_config(args, seed, surgery=False) if "fedbpt-remap" in settings else None
    start = time.perf_counter()
    run, records, summary = run_fedbpt_personal_experiment(
        _data(args),
        fed,
        EngineConfig(rounds=args.rounds, seed=seed),
        BlackBoxConfig(max_length=args.max_length),
        remap,
        tempfile.mkdtemp(prefix="bbfl-zoo-fedbpt-"),
    )
    seconds = time.perf_counter() - start
    updates = max(1, summary["client_updates"])
    common = {
        "zero_shot_personal_acc": summary["start"]["personal_accuracy"],  # z = 0: the prompt p0
        "no_prompt_personal_acc": summary["no_prompt"]["personal_accuracy"],
        "global_acc": summary["test_accuracy"],  # the global prompt; a re-mapping is personal
        "queries_per_client_step": fed.local_popsize,
        "queries_per_client_round": fed.local_iter * fed.local_popsize + 1,
        **_traffic(records),
        "seconds": seconds,
        "run_dir": str(run.path),
    }
    rows = []
    for setting in settings:
        result = summary["global" if setting == "fedbpt" else "remap"]
        row = {
            "setting": setting,
            "personal_acc": result["personal_accuracy"],
            "personal_acc_min": result["personal_accuracy_min"],
            "personal_acc_client_mean": result["personal_accuracy_client_mean"],
            **common,
        }
        client, blackbox, remap_s = summary["client_seconds"], summary["client_blackbox_seconds"], 0.0
        queries = summary["train_queries"]
        if setting == "fedbpt-remap":  # the one-off re-mapping, spread over the run's client-rounds
            client += summary["remap_seconds"] + summary["remap_blackbox_seconds"]
            blackbox += summary["remap_blackbox_seconds"]
            remap_s = summary["remap_seconds"]
            queries += summary["remap_queries"]
            row["remap_seconds_per_client"] = (summary["remap_seconds"] + summary["remap_blackbox_seconds"]) / len(
                summary["remap"]["client_accuracies"]
            )
        row.update(
            train_queries=queries, client_seconds_per_round=client / updates, **_shares(client, blackbox, remap_s)
        )
        rows.append(row)
    return rows


def run_zero_shot(args, seed: int) -> list[dict]:
    from bbfl.experiment import BlackBoxConfig, prepare_personal_data
    from bbfl.methods.bbt import evaluate_prompt
    from bbfl.methods.zoopfl import personal_accuracy_of_prompt

    start = time.perf_counter()
    task, _, tests, test = prepare_personal_data(_data(args), seed)
    blackbox = BlackBoxConfig(max_length=args.max_length).build()
    result = personal_accuracy_of_prompt(blackbox, None, [blackbox.encode(task, s) for s in tests])
    global_acc, _ = evaluate_prompt(blackbox, None, blackbox.encode(task, test))
    return [
        {
            "setting": "zero-shot",
            "personal_acc": result["personal_accuracy"],
            "personal_acc_min": result["personal_accuracy_min"],
            "personal_acc_client_mean": result["personal_accuracy_client_mean"],
            "zero_shot_personal_acc": result["personal_accuracy"],
            "no_prompt_personal_acc": result["personal_accuracy"],
            "global_acc": global_acc,
            "queries_per_client_step": 0,
            "queries_per_client_round": 0,
            "train_queries": 0,
            "bytes_up": 0,
            "bytes_down": 0,
            "bytes_per_round": 0,
            "seconds": time.perf_counter() - start,
        }
    ]


def run_job(args, seed: int, job: tuple[str, ...]) -> list[dict]:
    """One job's rows, with the peak memory of the process that ran it."""
    from bbfl.memory import peak_memory_mb

    if job[0] in ZOOPFL_SETTINGS:
        rows = run_zoopfl(args, seed, job[0])
    elif job[0] == "zero-shot":
        rows = run_zero_shot(args, seed)
    else:
        rows = run_fedbpt(args, seed, list(job))
    memory = peak_memory_mb()
    return [{**row, **memory, "seed": seed, "task": args.task, "alpha": args.alpha} for row in rows]


def run_in_fresh_process(args, seed: int, job: tuple[str, ...]) -> list[dict]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_job, args, seed, job).result()


def check_clients(args, seed: int) -> None:
    """Stop early, with the reason, if a client has no training example (encoding it would fail later)."""
    from bbfl.experiment import prepare_personal_data

    _, trains, tests, _ = prepare_personal_data(_data(args), seed)
    empty = [c for c, s in enumerate(trains) if len(s) == 0]
    if empty:
        raise SystemExit(
            f"seed {seed}: clients {empty} have no training example after the {args.client_test_fraction:.0%} "
            f"per-client test holdout (client sizes {[len(a) + len(b) for a, b in zip(trains, tests)]}); "
            "try another --k-shot or seed"
        )


def _fmt(rows: list[dict], key: str, spec: str, scale: float = 1.0) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return format(scale * statistics.mean(values), spec) if values else "–"


def print_table(results: list[dict]) -> None:
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in results:
        groups.setdefault((r.get("task"), r.get("alpha")), {}).setdefault(r["setting"], []).append(r)
    for (task, alpha), by_setting in groups.items():
        print(f"\n{task}, Dirichlet {alpha}:\n")
        print(
            "| setting | personalised acc | worst client | client mean | global acc | start | queries / step "
            "| queries / client-round | up / down B | B / round | client s / round | black box / re-map / other % "
            "| peak RSS MB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for setting, rows in by_setting.items():
            acc = [100 * r["personal_acc"] for r in rows]
            std = statistics.stdev(acc) if len(acc) > 1 else 0.0
            split = "–"
            if rows[0].get("blackbox_share") is not None:
                split = " / ".join(_fmt(rows, k, ".0f", 100) for k in ("blackbox_share", "remap_share", "other_share"))
            print(
                f"| {setting} | {statistics.mean(acc):.2f} ± {std:.2f} | "
                f"{_fmt(rows, 'personal_acc_min', '.1f', 100)} | "
                f"{_fmt(rows, 'personal_acc_client_mean', '.2f', 100)} | {_fmt(rows, 'global_acc', '.2f', 100)} | "
                f"{_fmt(rows, 'zero_shot_personal_acc', '.2f', 100)} | {rows[0]['queries_per_client_step']:.2g} | "
                f"{_fmt(rows, 'queries_per_client_round', '.3g')} | "
                f"{rows[0]['bytes_up']:,.0f} / {rows[0]['bytes_down']:,} | {_fmt(rows, 'bytes_per_round', ',.0f')} | "
                f"{_fmt(rows, 'client_seconds_per_round', '.2f')} | {split} | {_fmt(rows, 'cpu_peak_rss_mb', ',.0f')} |"
            )
        every = [r for rows in by_setting.values() for r in rows]
        no_prompt = [100 * r["no_prompt_personal_acc"] for r in every if r.get("no_prompt_personal_acc") is not None]
        if no_prompt:
            print(f"\nzero-shot (no prompt) personalised accuracy: {statistics.mean(no_prompt):.2f}")
        else:  # results written before the baselines existed
            zero = [100 * r["zero_shot_personal_acc"] for r in every]
            print(f"\nzero-shot (round 0) personalised accuracy: {statistics.mean(zero):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[13])
    ap.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--k-shot", type=int, default=40, help="examples per class over all clients")
    ap.add_argument("--client-test-fraction", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--zo-queries", type=int, default=8)
    ap.add_argument("--fedbpt-dim", type=int, default=500, help="FedBPT's intrinsic dimension d")
    ap.add_argument("--fedbpt-prompt-length", type=int, default=10)
    ap.add_argument("--fedbpt-popsize", type=int, default=5)
    ap.add_argument("--fedbpt-local-iter", type=int, default=8, help="CMA-ES generations per client-round")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--test-limit", type=int, default=300)
    ap.add_argument("--out", default="zoopfl_results.jsonl")
    ap.add_argument("--table", default=None, help="print the table of this results file and exit")
    args = ap.parse_args()
    if args.table:
        print_table([json.loads(line) for line in Path(args.table).read_text().splitlines()])
        return
    jobs = [(s,) for s in args.settings if s in ZOOPFL_SETTINGS]
    fedbpt = tuple(s for s in args.settings if s in FEDBPT_SETTINGS)
    jobs += [fedbpt] if fedbpt else []
    jobs += [("zero-shot",)] if "zero-shot" in args.settings else []
    results = []
    for seed in args.seeds:
        check_clients(args, seed)
        for job in jobs:
            for row in run_in_fresh_process(args, seed, job):
                results.append(row)
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(f"\n{args.task}: {args.clients} clients, Dirichlet {args.alpha}, {args.rounds} rounds")
    print_table(results)


if __name__ == "__main__":
    main()
