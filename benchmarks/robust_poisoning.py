"""FedBPT with 2 of 10 clients poisoned: plain aggregation vs. FedMedian, trimmed mean and Krum.

Two attacks (``--attack``), both finite and under the wire's norm limit, so validation cannot catch
them: only a robust rule can.

* ``shift``: the poisoned clients run their local CMA-ES honestly, then upload their mean shifted by
  ``--shift`` per coordinate.
* ``flip-boost`` (label flipping + model replacement, Bagdasaryan et al. 2020): the poisoned clients
  train on labels shifted by one class, then upload ``global + boost * (local - global)`` with
  ``boost`` = clients / poisoned clients, so that plain averaging lands on their prompt.

The same clients, data and seeds for every rule; one run without an attack as reference.

    python benchmarks/robust_poisoning.py --task sst2 --data-dir ../shared/data/sst2 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from bbfl.data import Split
from bbfl.experiment import BlackBoxConfig, FederatedDataConfig, prepare_federated_data
from bbfl.federation.engine import EngineConfig, run_federation
from bbfl.methods.fedbpt import FedBPTConfig
from bbfl.methods.fedbpt.experiment import fedbpt_method

RULES = ("fedbpt", "fedavg", "median", "trimmed", "krum")


def poison(method, clients: set[int], attack: str, shift: float, boost: float) -> None:
    """Make ``clients`` of ``method`` upload a poisoned mean (see the module docstring)."""
    honest = method.client_update

    def client_update(client, round_, arrays, header, seed):
        update, head = honest(client, round_, arrays, header, seed)
        if client in clients:
            mean = update["mean"]
            if attack == "shift":
                mean = mean + shift
            else:  # model replacement: scale the poisoned step so that the average lands on it
                start = arrays["mean"].astype(mean.dtype)
                mean = start + boost * (mean - start)
            update = {**update, "mean": mean}
        return update, head

    method.client_update = client_update


def flip_labels(split: Split, num_classes: int) -> Split:
    """The same texts with every label moved to the next class (binary: flipped)."""
    return Split(split.texts, (split.labels + 1) % num_classes, split.text_pairs)


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
    malicious = set(range(args.malicious))
    if attacked and args.attack == "flip-boost":
        splits = [flip_labels(s, len(task.labels)) if c in malicious else s for c, s in enumerate(splits)]
    method = fedbpt_method(fed, engine, blackbox, task, splits, test)
    if attacked:
        boost = args.boost or args.clients / max(1, args.malicious)
        poison(method, malicious, args.attack, args.shift, boost)
    start = time.perf_counter()
    records = run_federation(method, engine, tempfile.mkdtemp(prefix="bbfl-poison-"))
    return {
        "rule": rule,
        "attacked": attacked,
        "malicious": args.malicious if attacked else 0,
        "attack": args.attack,
        "shift": args.shift,
        "zero_shot": records[0]["test_accuracy"],
        "test_acc": records[-1]["test_accuracy"],
        "curve": [round(r["test_accuracy"], 4) for r in records],
        "final_mean": method.mean.astype(float).tolist(),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--malicious", type=int, default=2)
    parser.add_argument("--attack", default="shift", choices=("shift", "flip-boost"))
    parser.add_argument("--shift", type=float, default=5.0, help="shift: added to each coordinate of a poisoned mean")
    parser.add_argument("--boost", type=float, default=None, help="flip-boost: scale (default clients / poisoned)")
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
    # how far the attack moved the global prompt: || z_final - z_final(no attack) || / || z_final(no attack) ||
    clean = np.asarray(results[0]["final_mean"])
    print(f"| rule | poisoned clients | test accuracy after {args.rounds} rounds | curve | drift of z from no-attack |")
    print("|---|---|---|---|---|")
    for r in results:
        curve = ", ".join(f"{100 * a:.1f}" for a in r["curve"])
        drift = np.linalg.norm(np.asarray(r["final_mean"]) - clean) / max(np.linalg.norm(clean), 1e-12)
        acc = 100 * r["test_acc"]
        print(f"| {r['rule']} | {r['malicious']} of {args.clients} | {acc:.1f} | {curve} | {drift:.2f} |")


if __name__ == "__main__":
    main()
