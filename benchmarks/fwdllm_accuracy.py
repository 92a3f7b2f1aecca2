"""FwdLLM and FedKSeed vs. zero-shot and vs. backprop in the same harness, on real data.

Every setting federates the same k-shot pool over the same clients (IID) with LoRA r = 8 on the
embedded MiniLM; round 0 of every run is the zero-shot model (LoRA's B = 0). Results are appended to a
JSON-lines file as they finish and printed as a markdown table.

    python benchmarks/fwdllm_accuracy.py --task sst2 --data-dir ../shared/data/sst2 \
        --settings backprop fwdllm fwdllm-seed fwdllm-pace fwdllm-disc fedkseed
    python benchmarks/fwdllm_accuracy.py --table results.jsonl

Learning rates are chosen on dev, never on test: ``--sweep-lrs 0.5 0.05 0.005`` first runs each setting
at each rate with 20% of every client's training examples held out (the union is the dev set: it comes
from the training pool, the test set is never read), keeps the rate with the best final dev accuracy,
then runs that rate on the full clients and reports test accuracy. The row records every rate's dev
accuracy (``dev_acc_by_lr``) and ``lr_chosen_on: "dev"``. With few shots a 20% holdout is a handful of
examples; ``--dev-k N`` instead draws N more examples per class from the training pool, disjoint from
the clients' (BBT's "true few-shot" dev), and the clients keep all their examples during the sweep.
So with ``--dev-k`` the sweep's run at the chosen rate *is* the test run's training (same clients, seed
and rate): its final weights are scored on test instead of being trained a second time.

Slow models: ``--runs-dir D`` keeps each sweep run in ``D/<task>-<setting>-seed<S>-lr<R>`` and reads a
finished one back instead of training it again, so the rates can run as separate processes (one per
core, ``--dev-only``), then one call with every rate picks on dev and scores the chosen run on test:

    python benchmarks/fwdllm_accuracy.py --task agnews ... --dev-k 25 --sweep-lrs 0.005 --runs-dir D --dev-only
    python benchmarks/fwdllm_accuracy.py --task agnews ... --dev-k 25 --sweep-lrs 0.005 0.0005 --runs-dir D

    python benchmarks/fwdllm_accuracy.py --task sst2 --data-dir ../shared/data/sst2 --rounds 3 \
        --settings fwdllm fedkseed --sweep-lrs 0.5 0.05 0.005 --out sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bbfl.data import Split
from bbfl.data.sampling import few_shot, holdout_per_client
from bbfl.experiment import BlackBoxConfig, FederatedDataConfig, prepare_federated_data
from bbfl.federation.engine import EngineConfig, run_federation
from bbfl.methods.fedkseed import FedKSeedConfig
from bbfl.methods.fwdllm import FwdLLMConfig
from bbfl.methods.fwdllm.experiment import forward_blackbox, forward_method, run_forward_experiment

DEV_FRACTION = 0.2  # of each client's training examples, held out for the learning-rate sweep

SETTINGS = {
    # name: (method, config overrides); lr is per setting because a single-direction forward estimate has
    # ~sqrt(d) times the norm of the true gradient (its mean is right, its variance is d times larger)
    "backprop": ("fwdllm", {"estimator": "backprop", "lr": 0.5}),
    "fwdllm": ("fwdllm", {"estimator": "central", "perturbations": 4, "lr": 0.05}),
    "fwdllm-seed": ("fwdllm", {"estimator": "central", "perturbations": 4, "lr": 0.05, "uplink": "seed"}),
    "fwdllm-pace": (
        "fwdllm",
        {"estimator": "central", "perturbations": 2, "max_perturbations": 16, "variance_threshold": 0.03, "lr": 0.05},
    ),
    "fwdllm-disc": ("fwdllm", {"estimator": "central", "perturbations": 4, "candidates": 10, "lr": 0.05}),
    "fwdllm-jvp": ("fwdllm", {"estimator": "jvp", "perturbations": 4, "lr": 0.05}),
    "fedkseed": ("fedkseed", {"local_steps": 20, "lr": 5e-3}),
    "fedkseed-pro": ("fedkseed", {"local_steps": 20, "lr": 5e-3, "pro": True}),
}


def _data_config(args) -> FederatedDataConfig:
    return FederatedDataConfig(
        task=args.task, data_dir=args.data_dir, k_shot=args.k_shot, test_limit=args.test_limit, num_clients=args.clients
    )


def _blackbox_config(args) -> BlackBoxConfig:
    return BlackBoxConfig(model=args.model, max_length=args.max_length)


def _engine_config(args, seed: int) -> EngineConfig:
    return EngineConfig(rounds=args.rounds, seed=seed, eval_every=args.eval_every)


def _method_config(args, seed: int, setting: str, lr: float | None):
    name, overrides = SETTINGS[setting]
    cls = FwdLLMConfig if name == "fwdllm" else FedKSeedConfig
    if lr is not None:
        overrides = {**overrides, "lr": lr}
    return name, cls(peft=args.peft, seed=seed, batch_size=args.batch_size, **overrides)


# what a sweep run's training depends on besides setting, seed and rate: a kept run made with other values
# must not be read back as this one
SWEEP_RUN_KEYS = (
    "task", "data_dir", "model", "peft", "k_shot", "dev_k", "clients", "rounds", "batch_size", "max_length",
)  # fmt: skip


def sweep_run_dir(args, seed: int, setting: str, lr: float) -> Path:
    """Where the sweep's run at this rate lives: under ``--runs-dir`` (kept, and read back when finished)."""
    if args.runs_dir is None:
        return Path(tempfile.mkdtemp(prefix=f"bbfl-dev-{setting}-"))
    path = Path(args.runs_dir) / f"{args.task}-{setting}-seed{seed}-lr{lr:g}"
    made_with = {key: getattr(args, key) for key in SWEEP_RUN_KEYS}
    record = path / "sweep.json"
    if record.is_file():
        kept = json.loads(record.read_text())
        differ = {k: (kept.get(k), v) for k, v in made_with.items() if kept.get(k) != v}
        if differ:
            raise SystemExit(f"{path} was made with other settings (kept, now): {differ}; use another --runs-dir")
    elif path.exists() and any(path.iterdir()):
        raise SystemExit(f"{path} holds a run without sweep.json: cannot tell what it was made with")
    else:
        path.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(made_with, indent=1))
    return path


def dev_accuracy(args, seed: int, setting: str, lr: float) -> tuple[float, Path]:
    """Final accuracy on a dev set from the training pool (the test split is never read), and the run's dir.

    The dev set is 20% of each client's examples, or with ``--dev-k`` that many more per class, disjoint.
    A finished run in ``--runs-dir`` is read back (the engine resumes it with no rounds left).
    """
    name, cfg = _method_config(args, seed, setting, lr)
    engine = _engine_config(args, seed)
    task, client_splits, _ = prepare_federated_data(_data_config(args), cfg.seed)
    if args.dev_k:
        # the same draw as the clients' pool (same seed, same per-class permutation), then dev_k more per class
        trains, (_, dev) = client_splits, few_shot(task.train, args.k_shot, seed=cfg.seed, dev_k=args.dev_k)
    else:
        trains, devs = holdout_per_client(client_splits, DEV_FRACTION, seed)
        dev = Split(
            [t for d in devs for t in d.texts],
            [y for d in devs for y in d.labels],
            None if devs[0].text_pairs is None else [p for d in devs for p in d.text_pairs],
        )
    blackbox = forward_blackbox(_blackbox_config(args), cfg.peft).build()
    method = forward_method(name, cfg, engine, blackbox, task, trains, dev)  # "test" = dev here
    run_dir = sweep_run_dir(args, seed, setting, lr)
    records = run_federation(method, engine, run_dir)
    return records[-1]["test_accuracy"], run_dir


def choose_lr(args, seed: int, setting: str) -> tuple[float, dict[str, float], Path]:
    """The rate with the best final dev accuracy (ties: the first listed), every rate's score, its run."""
    runs = {lr: dev_accuracy(args, seed, setting, lr) for lr in args.sweep_lrs}
    scores = {str(lr): acc for lr, (acc, _) in runs.items()}
    best = max(args.sweep_lrs, key=lambda lr: scores[str(lr)])
    print(json.dumps({"setting": setting, "seed": seed, "dev_acc_by_lr": scores, "chosen_lr": best}), flush=True)
    return best, scores, runs[best][1]


def score_sweep_run_on_test(args, seed: int, setting: str, lr: float, run_dir: Path) -> list[dict]:
    """Round 0 and the final round of a finished ``--dev-k`` sweep run, scored on test.

    With ``--dev-k`` the sweep trained on exactly the clients' examples with this seed and rate, so its
    final weights are those a test run would train: they are loaded from its checkpoint, not retrained.
    """
    name, cfg = _method_config(args, seed, setting, lr)
    engine = _engine_config(args, seed)
    task, client_splits, test = prepare_federated_data(_data_config(args), cfg.seed)
    blackbox = forward_blackbox(_blackbox_config(args), cfg.peft).build()
    method = forward_method(name, cfg, engine, blackbox, task, client_splits, test)
    untuned = {"round": 0, **method.evaluate(0)}
    trained = run_federation(method, engine, run_dir)  # finished: loads the final state, trains nothing
    if trained[-1]["round"] != args.rounds:
        raise SystemExit(f"{run_dir} stopped at round {trained[-1]['round']}, not {args.rounds}: rerun the sweep")
    return [untuned, {**trained[-1], **method.evaluate(args.rounds)}]


def run_setting(args, seed: int, setting: str) -> dict:
    lr, dev_scores, sweep_run = args.lr, None, None
    if args.sweep_lrs:
        lr, dev_scores, sweep_run = choose_lr(args, seed, setting)
    name, cfg = _method_config(args, seed, setting, lr)
    start = time.perf_counter()
    if sweep_run is not None and args.dev_k:
        records = score_sweep_run_on_test(args, seed, setting, lr, sweep_run)
    else:
        data, bb = _data_config(args), _blackbox_config(args)
        engine = _engine_config(args, seed)
        _, records = run_forward_experiment(name, data, cfg, engine, bb, tempfile.mkdtemp(prefix=f"bbfl-{name}-"))
    last = records[-1]
    chosen = {"lr_chosen_on": "dev", "dev_acc_by_lr": dev_scores} if dev_scores else {"lr_chosen_on": "fixed"}
    return {
        "setting": setting,
        "lr": cfg.lr,
        **chosen,
        "trained_in_sweep": sweep_run is not None and bool(args.dev_k),
        "seed": seed,
        "task": args.task,
        "model": args.model,
        "zero_shot_acc": records[0]["test_accuracy"],
        "test_acc": last["test_accuracy"],
        "best_round_acc": max(r["test_accuracy"] for r in records if "test_accuracy" in r),
        "curve": [round(r["test_accuracy"], 4) if "test_accuracy" in r else None for r in records],
        "queries": last["train_queries"],
        "bytes_up_per_client_round": last["bytes_up_per_client"],
        "bytes_down_per_client_round": last["bytes_down_per_client"],
        "peak_rss_mb": last.get("cpu_peak_rss_mb"),
        "seconds": round(time.perf_counter() - start, 1),
        "rounds": args.rounds,
        "clients": args.clients,
        "k_shot": args.k_shot,
        "dev_k": args.dev_k,
    }


def print_table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print("| task | setting | lr | seed | zero-shot | final acc | best round | queries | up B | down B | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['task']} | {r['setting']} | {r.get('lr', '')} | {r['seed']} | {r['zero_shot_acc']:.3f} | "
            f"{r['test_acc']:.3f} | "
            f"{r['best_round_acc']:.3f} | {r['queries']:,} | {r['bytes_up_per_client_round']:,.0f} | "
            f"{r['bytes_down_per_client_round']:,.0f} | {r['seconds']:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[13])
    parser.add_argument("--peft", default="lora")
    parser.add_argument("--model", default=None, help="model name, directory or .gguf (default: embedded MiniLM)")
    parser.add_argument("--lr", type=float, default=None, help="override every setting's learning rate")
    parser.add_argument(
        "--sweep-lrs", type=float, nargs="+", default=None, help="choose each setting's lr among these on dev"
    )
    parser.add_argument(
        "--dev-k", type=int, default=None, help="sweep dev: this many more per class, disjoint (default: 20%% holdout)"
    )
    parser.add_argument("--runs-dir", default=None, help="keep sweep runs here; a finished one is read back")
    parser.add_argument("--dev-only", action="store_true", help="only run the sweep and print dev accuracies")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--k-shot", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=1, help="score every N rounds (round 0 and last always)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", default="fwdllm_results.jsonl")
    parser.add_argument("--table", default=None, help="only print the table of this results file")
    args = parser.parse_args()
    if args.table:
        print_table(Path(args.table))
        return
    out = Path(args.out)
    if args.dev_only and not args.sweep_lrs:
        parser.error("--dev-only needs --sweep-lrs")
    for seed in args.seeds:
        for setting in args.settings:
            if args.dev_only:
                choose_lr(args, seed, setting)
                continue
            result = run_setting(args, seed, setting)
            with out.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    if not args.dev_only:
        print_table(out)


if __name__ == "__main__":
    main()
