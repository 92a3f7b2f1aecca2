"""FedBPT vs. centralised BBT on real data: IID and Dirichlet splits, fedbpt vs. fedavg, fp16 transport.

For each seed the same k-shot pool is drawn once and (a) split over the clients, or (b) given whole to
one centralised BBT run. Centralised BBT gets the same cost as the federation, matched either on
*queries* (candidate evaluations; BBT's unit - the issue's comparison) or on *examples scored*
(forward passes = tokens billed), by `--match`. Both runs report the final CMA-ES mean's test
accuracy (no dev set: FedBPT has none). Results are appended to a JSON-lines file as they finish,
so an interrupted benchmark keeps what it measured; the markdown table is printed at the end.

The README's tables (SST-2: ~4 min per federated run, 1.5 min per centralised one, on 2 idle cores;
AG News: ~3 and ~1.5 min):

    python benchmarks/fedbpt_accuracy.py --task sst2 --data-dir ../shared/data/sst2 --seeds 13 42 100 \
        --rounds 10 --test-limit 500 --settings fedbpt-iid fedbpt-dir fedavg-iid fedavg-dir central
    python benchmarks/fedbpt_accuracy.py --task agnews --data-dir ../shared/data/agnews --k-shot 20 \
        --max-length 64 --rounds 6 --test-limit 300 --seeds 13 42 100 \
        --settings fedbpt-iid fedbpt-dir fedavg-iid fedavg-dir central
    python benchmarks/fedbpt_accuracy.py --seeds 13 --rounds 10 --test-limit 500 --settings fedbpt-iid-fp16

The paper's settings (fitness ratio with 50% token perturbation, drawn afresh each round, and the
server covariance in the downlink), 3 seeds, IID and Dirichlet 0.5, next to the plain rule:

    python benchmarks/fedbpt_accuracy.py --task sst2 --data-dir ../shared/data/sst2 --seeds 13 42 100 \
        --rounds 10 --test-limit 500 \
        --settings fedbpt-iid-paper fedbpt-dir-paper fedbpt-iid-plain fedbpt-dir-plain central

(`fedbpt-iid` / `fedbpt-dir` take FedBPTConfig's default, the fitness ratio since it became the default;
the MiniLM tables above ran them before that, i.e. with the plain loss, now `fedbpt-*-plain`.)

The fitness ratio alone (no covariance in the downlink, which stays 2 KB), to tell the two apart:

    python benchmarks/fedbpt_accuracy.py --task sst2 --data-dir ../shared/data/sst2 --seeds 13 42 100 \
        --rounds 10 --test-limit 500 --prompt-attention prefix --settings fedbpt-dir-ratio fedbpt-iid-ratio

The replay uplink (seed + candidate ranks up; the same state as dense, bit for bit) with its bytes and
the server's replay seconds per round:

    python benchmarks/fedbpt_accuracy.py --seeds 13 --rounds 3 --test-limit 200 --settings fedbpt-iid fedbpt-iid-replay
    python benchmarks/fedbpt_accuracy.py --table results.jsonl    # only print the table of a results file

SmolLM2 on AG News (the README's table): one setting and seed per process, one core each; the
federated runs score 2 x 41 x 32 x 5 = 13,120 examples, so `central` gets that budget up front and runs
on its own core (~27 min per federated run, ~18 min per centralised one, on one core):

    python benchmarks/fedbpt_accuracy.py --task agnews --data-dir ../shared/data/agnews --model smollm2 \
        --prompt-position after_input --seeds S --rounds 5 --k-shot 8 --test-limit 500 --threads 1 \
        --eval-every 5 --central-examples 13120 --settings X    # X: fedbpt-iid, fedbpt-dir, central, ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bbfl.blackbox.placement import prompt_origin
from bbfl.experiment import BlackBoxConfig, FederatedDataConfig, prepare_federated_data
from bbfl.federation.engine import EngineConfig
from bbfl.io import load_arrays
from bbfl.methods.bbt import BBTConfig, SubspaceProjection, evaluate_prompt, run_bbt
from bbfl.methods.fedbpt import FedBPTConfig
from bbfl.methods.fedbpt.experiment import run_fedbpt_experiment

PAPER = {"perturb_rate": 0.5, "downlink_covariance": True}  # the official fitness ratio and C in the downlink
RATIO = {"perturb_rate": 0.5}  # the fitness ratio alone: mean and sigma down, no covariance
PLAIN = {"perturb_rate": 0.0}  # the plain loss (centralised BBT's objective), not the fitness ratio
SETTINGS = {
    # name: (partition, aggregation, transport, further FedBPTConfig fields)
    "fedbpt-iid": ("iid", "fedbpt", "float32", {}),
    "fedbpt-dir": ("dirichlet", "fedbpt", "float32", {}),
    "fedavg-iid": ("iid", "fedavg", "float32", {}),
    "fedavg-dir": ("dirichlet", "fedavg", "float32", {}),
    "fedbpt-iid-fp16": ("iid", "fedbpt", "float16", {}),
    "fedbpt-dir-fp16": ("dirichlet", "fedbpt", "float16", {}),
    "fedbpt-iid-paper": ("iid", "fedbpt", "float32", PAPER),
    "fedbpt-dir-paper": ("dirichlet", "fedbpt", "float32", PAPER),
    "fedbpt-iid-ratio": ("iid", "fedbpt", "float32", RATIO),
    "fedbpt-dir-ratio": ("dirichlet", "fedbpt", "float32", RATIO),
    "fedbpt-iid-plain": ("iid", "fedbpt", "float32", PLAIN),
    "fedbpt-dir-plain": ("dirichlet", "fedbpt", "float32", PLAIN),
    "fedbpt-iid-replay": ("iid", "fedbpt", "float32", {"uplink": "replay"}),
    "fedbpt-iid-paper-replay": ("iid", "fedbpt", "float32", {**PAPER, "uplink": "replay"}),
}


def run_federated(args, seed: int, setting: str) -> dict:
    partition, aggregation, transport, extra = SETTINGS[setting]
    data = _data_config(args, args.clients, partition)
    fed = _fed_config(args, seed, aggregation, **extra)
    engine = EngineConfig(rounds=args.rounds, seed=seed, transport_dtype=transport, eval_every=args.eval_every)
    bb = _blackbox_config(args)
    # zero-shot (no prompt) is the same for every setting of a task: the BBT tables score it once
    run, records = run_fedbpt_experiment(
        data, fed, engine, bb, tempfile.mkdtemp(prefix="bbfl-fedbpt-"), score_zero_shot=False
    )
    last = records[-1]
    client_sizes = json.loads((run.path / "config.json").read_text())["client_sizes"]
    copies = 2 if fed.perturb_rate > 0 else 1  # the fitness ratio also scores the perturbed copy
    examples = copies * sum(
        (args.local_iter * args.local_popsize + 1) * client_sizes[c] for r in records[1:] for c in r["aggregated"]
    )
    return {
        "test_acc": last["test_accuracy"],
        "start_acc": records[0]["test_accuracy"],
        "train_queries": last["train_queries"],
        "train_examples": examples,
        "bytes_up": last["bytes_up_per_client"],
        "bytes_down": last["bytes_down_per_client"],
        # rounds that --eval-every left unscored are None
        "curve": [r.get("test_accuracy") for r in records],
        "sigma_curve": [r.get("global_sigma") for r in records],
        "train_loss_curve": [r.get("train_loss") for r in records],
        **(
            {"replay_seconds_per_round": float(np.mean([r["replay_seconds"] for r in records[1:]]))}
            if fed.uplink == "replay"
            else {}
        ),
        **(server_ranking(run.path) if aggregation == "fedbpt" else {}),
        "run_dir": str(run.path),
    }


def server_ranking(run_dir: Path) -> dict:
    """Which clients FedBPT's server ranked first (by their own-data fitness), from the saved server state.

    ``first_ranked_data_share``: the top-ranked client's share of all examples, averaged over rounds (IID:
    1 / clients); ``smallest_ranked_first``: the share of rounds in which the smallest client ranked first.
    """
    arrays = load_arrays(run_dir / "server_state.safetensors")[0]
    shares, smallest = [], []
    for key in (k for k in arrays if k.endswith(".fitnesses")):  # r{round}.fitnesses, see FedBPT.state()
        sizes, first = arrays[key.replace(".fitnesses", ".weights")], int(np.argmin(arrays[key]))
        shares.append(float(sizes[first] / sizes.sum()))
        if sizes.min() < sizes.max():  # equal sizes (IID): "the smallest" means nothing
            smallest.append(bool(sizes[first] == sizes.min()))
    out = {"first_ranked_data_share": float(np.mean(shares))} if shares else {}
    if smallest:
        out["smallest_ranked_first"] = float(np.mean(smallest))
    return out


def run_central(args, seed: int, queries: int, examples: int) -> dict:
    """BBT on the union of the clients' data (one client, the whole pool) at the federation's cost."""
    data = _data_config(args, 1, "iid")
    task, (pool,), test = prepare_federated_data(data, seed)
    blackbox = _blackbox_config(args).build()
    train_e, test_e = blackbox.encode(task, pool), blackbox.encode(task, test)
    budget = queries if args.match == "queries" else max(args.popsize, examples // len(pool))
    cfg = BBTConfig(
        intrinsic_dim=args.intrinsic_dim,
        prompt_length=args.prompt_length,
        popsize=args.popsize,
        budget=budget,
        eval_every=10**9,  # no dev set: score the final mean, as FedBPT does
        seed=seed,
    )
    p0 = prompt_origin(blackbox, cfg.prompt_init, cfg.prompt_length)
    projection = SubspaceProjection(cfg.intrinsic_dim, p0, blackbox.embedding_std, cfg.alpha, cfg.sigma0, seed=seed)
    result = run_bbt(cfg, blackbox, train_e, train_e, projection, task.loss)
    acc, _ = evaluate_prompt(blackbox, projection(result.z_mean), test_e, task.loss)
    return {"test_acc": acc, "train_queries": result.train_queries, "train_examples": result.train_queries * len(pool)}


def _blackbox_config(args) -> BlackBoxConfig:
    return BlackBoxConfig(
        model=args.model,
        max_length=args.max_length,
        prompt_attention=args.prompt_attention,
        prompt_position=args.prompt_position,
    )


def _data_config(args, clients: int, partition: str) -> FederatedDataConfig:
    return FederatedDataConfig(
        task=args.task,
        data_dir=args.data_dir,
        k_shot=args.k_shot,
        test_limit=args.test_limit,
        num_clients=clients,
        partition=partition,
        alpha=args.alpha,
    )


def _fed_config(args, seed: int, aggregation: str, **extra) -> FedBPTConfig:
    return FedBPTConfig(
        intrinsic_dim=args.intrinsic_dim,
        prompt_length=args.prompt_length,
        local_popsize=args.local_popsize,
        local_iter=args.local_iter,
        aggregation=aggregation,
        seed=seed,
        **extra,
    )


def print_table(results: list[dict]) -> None:
    by_setting: dict[str, list[dict]] = {}
    for r in results:
        by_setting.setdefault(r["setting"], []).append(r)
    print("| setting | test accuracy (mean ± std) | per seed | train queries | examples scored | up / down B |")
    print("|---|---|---|---|---|---|")
    for setting, rows in by_setting.items():
        accs = [100 * r["test_acc"] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        seeds = ", ".join(f"{a:.1f} (s{r['seed']})" for a, r in zip(accs, rows))
        wire = f"{rows[0]['bytes_up']:,.0f} / {rows[0]['bytes_down']:,}" if "bytes_up" in rows[0] else "-"
        queries = statistics.mean(r["train_queries"] for r in rows)
        examples = statistics.mean(r["train_examples"] for r in rows)
        print(
            f"| {setting} | {statistics.mean(accs):.2f} ± {std:.2f} | {seeds} | {queries:,.0f} | {examples:,.0f} "
            f"| {wire} |"
        )
    for setting, rows in by_setting.items():
        ranked = [r for r in rows if "first_ranked_data_share" in r]
        if ranked:
            share = statistics.mean(r["first_ranked_data_share"] for r in ranked)
            line = f"\n{setting}: the client FedBPT's server ranked first held {100 * share:.1f}% of the examples"
            smallest = [r["smallest_ranked_first"] for r in ranked if "smallest_ranked_first" in r]
            if smallest:
                line += f" and was the smallest client in {100 * statistics.mean(smallest):.0f}% of rounds"
            print(line)
    for setting, rows in by_setting.items():
        replayed = [r["replay_seconds_per_round"] for r in rows if "replay_seconds_per_round" in r]
        if replayed:
            print(f"\n{setting}: the server's replay took {statistics.mean(replayed):.3f} s per round")
    starts = [100 * r["start_acc"] for r in results if "start_acc" in r]
    if starts:
        print(f"\nstarting prompt (z = 0, zero-shot) accuracy: {statistics.mean(starts):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[13, 42, 100])
    ap.add_argument("--settings", nargs="+", default=["central", "fedbpt-iid", "fedbpt-dir"])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--k-shot", type=int, default=40, help="examples per class over all clients (paper: 200)")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-iter", type=int, default=8)
    ap.add_argument("--local-popsize", type=int, default=5)
    ap.add_argument("--popsize", type=int, default=20, help="centralised BBT population")
    ap.add_argument("--intrinsic-dim", type=int, default=500)
    ap.add_argument("--prompt-length", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=1, help="score test every N rounds (round 0 and last always)")
    ap.add_argument("--match", choices=["queries", "examples"], default="examples")
    ap.add_argument(
        "--central-examples",
        type=int,
        default=None,
        help="run `central` alone at this many examples scored (a federated run's train_examples), e.g. on "
        "another core; without it `central` follows the seed's first federated run",
    )
    ap.add_argument("--prompt-attention", default="auto", help="auto (full: the paper's function) or prefix (faster)")
    ap.add_argument("--model", default=None, help="model name, directory or .gguf (default: embedded MiniLM)")
    ap.add_argument("--prompt-position", default="start", help="causal LMs: start (the paper's) or after_input")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default="fedbpt_results.jsonl", help="JSON-lines results file (appended)")
    ap.add_argument("--table", default=None, help="print the table of this results file and exit")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table:
        print_table([json.loads(line) for line in Path(args.table).read_text().splitlines()])
        return

    federated = [s for s in args.settings if s != "central"]
    if not federated and args.central_examples is None:
        ap.error("--settings needs a federated setting or --central-examples: centralised BBT is matched to its cost")
    if args.central_examples is not None and args.match != "examples":
        ap.error("--central-examples matches on examples; drop --match queries")
    results = []
    for seed in args.seeds:
        # the seed's first federated run fixes the centralised budget, unless it is given
        cost = None if args.central_examples is None else (None, args.central_examples)
        for setting in federated + (["central"] if "central" in args.settings else []):
            start = time.perf_counter()
            if setting == "central":
                row = run_central(args, seed, *cost)
            else:
                row = run_federated(args, seed, setting)
                cost = cost or (row["train_queries"], row["train_examples"])
            row.update(
                setting=setting, seed=seed, seconds=time.perf_counter() - start, task=args.task, model=args.model
            )
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(
        f"\n{args.task}: {args.clients} clients, {args.k_shot} shots/class in all, {args.rounds} rounds, "
        f"L={args.prompt_length}, d={args.intrinsic_dim}, centralised matched on {args.match}, "
        f"prompt attention {args.prompt_attention}\n"
    )
    print_table(results)


if __name__ == "__main__":
    main()
