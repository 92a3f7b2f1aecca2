"""Zero-shot vs. BBT vs. white-box prompt tuning, few-shot, several seeds, on real data.

Each seed draws its own k-shot train/dev sets (BBT's protocol), runs BBT and white-box tuning from
the same prompt init, and scores the test split. Writes a JSON file and prints a markdown table.

    python benchmarks/bbt_accuracy.py --task sst2 --data-dir ../shared/data/sst2 --seeds 13 42 100
    python benchmarks/bbt_accuracy.py --task agnews --data-dir ../shared/data/agnews --budget 400 \
        --max-length 64 --test-limit 1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch

from bbfl.experiment import BlackBoxConfig, DataConfig
from bbfl.methods.bbt import BBTConfig
from bbfl.methods.bbt.experiment import run_bbt_experiment
from bbfl.methods.prompt_tuning import PromptTuningConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[13, 42, 100])
    ap.add_argument("--k-shot", type=int, default=16)
    ap.add_argument("--budget", type=int, default=8000)
    ap.add_argument("--prompt-length", type=int, default=50)
    ap.add_argument("--whitebox-steps", type=int, default=100)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--prompt-attention", default="auto")
    ap.add_argument("--model", default=None, help="model name, directory or .gguf (default: embedded MiniLM)")
    ap.add_argument("--spec", default=None, help="task spec file (template, label words), e.g. a causal-LM template")
    ap.add_argument("--prompt-position", default="start", help="causal LMs: start (the paper's) or after_input")
    ap.add_argument("--whitebox-lr", type=float, default=None, help="white-box Adam lr (default: its config's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    per_method: dict[str, list[float]] = {}
    runs = []
    for seed in args.seeds:
        data = DataConfig(
            task=args.task, data_dir=args.data_dir, spec_file=args.spec, k_shot=args.k_shot, test_limit=args.test_limit
        )
        cfg = BBTConfig(budget=args.budget, prompt_length=args.prompt_length, seed=seed)
        bb = BlackBoxConfig(
            model=args.model,
            max_length=args.max_length,
            prompt_attention=args.prompt_attention,
            prompt_position=args.prompt_position,
        )
        whitebox = PromptTuningConfig(steps=args.whitebox_steps)
        if args.whitebox_lr is not None:
            whitebox = PromptTuningConfig(steps=args.whitebox_steps, lr=args.whitebox_lr)
        run, rows = run_bbt_experiment(data, cfg, bb, tempfile.mkdtemp(prefix="bbfl-acc-"), whitebox)
        runs.append({"seed": seed, "run_dir": str(run.path), "rows": rows})
        for row in rows:
            per_method.setdefault(row["method"], []).append(row["test_acc"])
        print(json.dumps({"seed": seed, "rows": rows}), flush=True)

    print(f"\n{args.task}, {args.k_shot}-shot, budget {args.budget}, seeds {args.seeds}\n")
    print("| method | test accuracy (mean ± std) | per seed |\n|---|---|---|")
    for method, accs in per_method.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        per_seed = ", ".join(f"{100 * a:.1f}" for a in accs)
        print(f"| {method} | {100 * statistics.mean(accs):.2f} ± {100 * std:.2f} | {per_seed} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "per_method": per_method}, f, indent=2)


if __name__ == "__main__":
    main()
