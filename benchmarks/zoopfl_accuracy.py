"""ZooPFL ablations on real data with strongly non-IID clients: personalised accuracy on each client's own test.

Settings: `both` (surgery + re-mapping, federated), `surgery` (surgery only), `remap` (re-mapping only:
the black box's zero-shot scores re-mapped per client), `local` (both, no federation: local-only
training). Round 0 of every run is the zero-shot starting point. Also reports queries per client
step, bytes per client-round and the share of client time spent outside the black box (the surgery
and re-mapping overhead). Results are appended to a JSON-lines file as runs finish.

    python benchmarks/zoopfl_accuracy.py --task sst2 --data-dir ../shared/data/sst2 --alpha 0.1 \
        --settings both surgery remap local --seeds 13
    python benchmarks/zoopfl_accuracy.py --table zoopfl_results.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bbfl.federation.engine import EngineConfig
from bbfl.methods.zoopfl import ZooPFLConfig
from bbfl.pipeline import BlackBoxConfig, PersonalDataConfig, run_zoopfl_experiment

SETTINGS = {
    "both": {},
    "surgery": {"remap": False},
    "remap": {"surgery": False},
    "local": {"federate": False},
}


def run_setting(args, seed: int, setting: str) -> dict:
    data = PersonalDataConfig(
        task=args.task,
        data_dir=args.data_dir,
        k_shot=args.k_shot,
        test_limit=args.test_limit,
        num_clients=args.clients,
        partition="dirichlet",
        alpha=args.alpha,
        client_test_fraction=args.client_test_fraction,
    )
    cfg = ZooPFLConfig(local_steps=args.local_steps, zo_queries=args.zo_queries, seed=seed, **SETTINGS[setting])
    bb = BlackBoxConfig(max_length=args.max_length)
    start = time.perf_counter()
    run, records = run_zoopfl_experiment(
        data, cfg, EngineConfig(rounds=args.rounds, seed=seed), bb, tempfile.mkdtemp(prefix="bbfl-zoo-")
    )
    first, last = records[0], records[-1]
    client_rounds = sum(len(r["aggregated"]) for r in records[1:])
    return {
        "personal_acc": last["personal_accuracy"],
        "personal_acc_min": last["personal_accuracy_min"],
        "zero_shot_personal_acc": first["personal_accuracy"],
        "global_acc": last["test_accuracy"],
        "queries_per_client_step": cfg.zo_queries + 1 if cfg.surgery else 1 / cfg.local_steps,
        "train_queries": last["train_queries"],
        "bytes_up": last["bytes_up_per_client"],
        "bytes_down": last["bytes_down_per_client"],
        "seconds_per_client_round": sum(r["seconds"] for r in records[1:]) / max(1, client_rounds),
        "seconds": time.perf_counter() - start,
        "run_dir": str(run.path),
    }


def print_table(results: list[dict]) -> None:
    by_setting: dict[str, list[dict]] = {}
    for r in results:
        by_setting.setdefault(r["setting"], []).append(r)
    print("| setting | personalised acc | worst client | global acc | queries / step | up / down B | s / client-round")
    print("|---|---|---|---|---|---|---")
    for setting, rows in by_setting.items():
        acc = [100 * r["personal_acc"] for r in rows]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(
            f"| {setting} | {statistics.mean(acc):.2f} ± {std:.2f} | "
            f"{100 * statistics.mean(r['personal_acc_min'] for r in rows):.1f} | "
            f"{100 * statistics.mean(r['global_acc'] for r in rows):.2f} | {rows[0]['queries_per_client_step']:.2g} | "
            f"{rows[0]['bytes_up']:,.0f} / {rows[0]['bytes_down']:,} | "
            f"{statistics.mean(r['seconds_per_client_round'] for r in rows):.2f}"
        )
    zero = [100 * r["zero_shot_personal_acc"] for r in results]
    print(f"\nzero-shot (round 0) personalised accuracy: {statistics.mean(zero):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[13])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--k-shot", type=int, default=40, help="examples per class over all clients")
    ap.add_argument("--client-test-fraction", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--zo-queries", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--test-limit", type=int, default=300)
    ap.add_argument("--out", default="zoopfl_results.jsonl")
    ap.add_argument("--table", default=None, help="print the table of this results file and exit")
    args = ap.parse_args()
    if args.table:
        print_table([json.loads(line) for line in Path(args.table).read_text().splitlines()])
        return
    results = []
    for seed in args.seeds:
        for setting in args.settings:
            row = run_setting(args, seed, setting)
            row.update(setting=setting, seed=seed, task=args.task, alpha=args.alpha)
            results.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"\n{args.task}: {args.clients} clients, Dirichlet {args.alpha}, {args.rounds} rounds\n")
    print_table(results)


if __name__ == "__main__":
    main()
