"""FedBPT with 2 of 10 clients poisoned: plain aggregation vs. FedMedian, trimmed mean and Krum.

The poisoned clients run their local CMA-ES honestly, then upload their mean shifted by ``--shift``
per coordinate (finite and under the wire's norm limit, so validation cannot catch it: only a robust
rule can). The same clients, data and seeds for every rule; one run without an attack as reference.

    python benchmarks/robust_poisoning.py --task sst2 --data-dir ../shared/data/sst2 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from bbfl.federation.engine import EngineConfig, run_federation
from bbfl.methods.fedbpt import FedBPTConfig
from bbfl.pipeline import BlackBoxConfig, FederatedDataConfig, _fedbpt_method, prepare_federated_data

RULES = ("fedbpt", "fedavg", "median", "trimmed", "krum")


def poison(method, clients: set[int], shift: float) -> None:
    """Make ``clients`` of ``method`` upload mean + shift (the attack)."""
    honest = method.client_update

    def client_update(client, round_, arrays, header, seed):
        update, head = honest(client, round_, arrays, header, seed)
        if client in clients:
            update = {**update, "mean": update["mean"] + shift}
        return update, head

    method.client_update = client_update


def run(args, rule: str, attacked: bool) -> dict:
    data = FederatedDataConfig(
        task=args.task,
        data_dir=args.data_dir,
        k_shot=args.k_shot,
        test_limit=args.test_limit,
        num_clients=args.clients,
    )
    fed = FedBPTConfig(
        intrinsic_dim=500,
        prompt_length=10,
        local_popsize=5,
        local_iter=args.local_iter,
        aggregation=rule,
        trim=0.2,
        num_malicious=args.malicious,
        seed=args.seed,
    )
    engine = EngineConfig(rounds=args.rounds, seed=args.seed)
    blackbox = BlackBoxConfig(max_length=args.max_length).build()
    task, splits, test = prepare_federated_data(data, args.seed)
    method = _fedbpt_method(fed, engine, blackbox, task, splits, test)
    if attacked:
        poison(method, set(range(args.malicious)), args.shift)
    start = time.perf_counter()
    records = run_federation(method, engine, tempfile.mkdtemp(prefix="bbfl-poison-"))
    return {
        "rule": rule,
        "attacked": attacked,
        "malicious": args.malicious if attacked else 0,
        "shift": args.shift,
        "zero_shot": records[0]["test_accuracy"],
        "test_acc": records[-1]["test_accuracy"],
        "curve": [round(r["test_accuracy"], 4) for r in records],
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--malicious", type=int, default=2)
    parser.add_argument("--shift", type=float, default=5.0, help="added to each coordinate of a poisoned mean")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-iter", type=int, default=4)
    parser.add_argument("--k-shot", type=int, default=40)
    parser.add_argument("--test-limit", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", default="poisoning_results.jsonl")
    args = parser.parse_args()
    results = []
    for rule, attacked in [("fedbpt", False)] + [(rule, True) for rule in args.rules]:
        results.append(run(args, rule, attacked))
        with open(args.out, "a") as f:  # as each run finishes: a long benchmark stopped early keeps its results
            f.write(json.dumps(results[-1]) + "\n")
    print(f"| rule | poisoned clients | test accuracy after {args.rounds} rounds | curve |")
    print("|---|---|---|---|")
    for r in results:
        curve = ", ".join(f"{100 * a:.1f}" for a in r["curve"])
        print(f"| {r['rule']} | {r['malicious']} of {args.clients} | {100 * r['test_acc']:.1f} | {curve} |")


if __name__ == "__main__":
    main()
