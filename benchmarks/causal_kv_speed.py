"""Causal-LM population scoring: the official serial loop vs. batched vs. key/values shared over the population.

With the prompt after the input (``prompt_position="after_input"``: ``[input][prompt][template tail]``)
every path below computes the same function on the same CMA-ES candidates and the same few-shot
train set, in the same precision; the scores are compared against the serial loop:

* ``serial``: the official BBT pattern -- one candidate at a time, one full forward over the batch
  padded to its longest example;
* ``batched``: all candidates in one full forward (no sharing);
* ``kv-shared``: ``LocalBlackBox(prompt_position="after_input")`` -- the inputs' key/values computed once
  per batch and tiled over the population; only the prompt and the tail run per candidate.

The paper's placement (prompt first, ``prompt_position="start"``) is timed too, batched, for reference:
it is a different function, so its scores are not compared.

    python benchmarks/causal_kv_speed.py --data-dir ../shared/data/sst2 --json sst2.json
    python benchmarks/causal_kv_speed.py --task agnews --data-dir ../shared/data/agnews --k-shot 4
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bbfl.blackbox import LocalBlackBox
from bbfl.blackbox.causal import scores_after_input
from bbfl.data import few_shot, load_task
from bbfl.methods.bbt import SubspaceProjection
from bbfl.optim import CMAES

# Templates for a causal LM (the label word continues the text); the registry's are the papers' MLM ones.
CAUSAL_TEMPLATES = {
    "sst2": dict(template="Review: {text}\nSentiment: {mask}", label_words=["negative", "positive"]),
    "agnews": dict(template="Article: {text}\nTopic: {mask}", label_words=["World", "Sports", "Business", "Tech"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2", choices=sorted(CAUSAL_TEMPLATES))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--k-shot", type=int, default=16, help="train examples per class (BBT: 16)")
    ap.add_argument(
        "--from-test",
        type=int,
        default=0,
        help="score N random test/dev examples instead of the few-shot train set (SST-2's train set is "
        "mostly short phrases; its dev sentences are ~25 tokens)",
    )
    ap.add_argument("--prompt-length", type=int, default=10)
    ap.add_argument("--popsize", type=int, default=20)
    ap.add_argument("--intrinsic-dim", type=int, default=500)
    ap.add_argument("--generations", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--skip-start", action="store_true", help="do not time the prompt-first placement")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    task = load_task(args.task, data_dir=args.data_dir, **CAUSAL_TEMPLATES[args.task])
    train, _ = few_shot(task.train, args.k_shot, seed=args.seed)
    if args.from_test:
        picked = np.random.default_rng(args.seed).choice(len(task.test), args.from_test, replace=False)
        train = task.test.subset(picked)
    shared = LocalBlackBox(args.model, dtype=args.dtype, prompt_position="after_input")
    start_bb = LocalBlackBox(args.model, dtype=args.dtype, prompt_position="start")
    data, data_start = shared.encode(task, train), start_bb.encode(task, train)
    p0 = shared.token_embeddings("the", args.prompt_length)
    projection = SubspaceProjection(args.intrinsic_dim, p0, shared.embedding_std, seed=args.seed)
    es = CMAES(np.zeros(args.intrinsic_dim), 1.0, args.popsize, seed=args.seed)
    prompts_per_gen = [projection(es.ask()) for _ in range(args.generations)]
    inputs = [data.input_ids[i] for i in torch.argsort(data.order).tolist()]  # original order
    tail, labels, pad = shared._tail_ids, shared.label_ids, shared._pad_id()

    @torch.inference_mode()
    def serial(prompts: torch.Tensor) -> torch.Tensor:
        prompts = prompts.to(shared.dtype)
        return torch.cat(
            [scores_after_input(shared.model, p[None], inputs, tail, labels, pad, share=False) for p in prompts]
        )

    @torch.inference_mode()
    def batched(prompts: torch.Tensor) -> torch.Tensor:
        return scores_after_input(shared.model, prompts.to(shared.dtype), inputs, tail, labels, pad, share=False)

    paths = {
        "serial (official loop), after_input": serial,
        "batched full forward, after_input": batched,
        "kv-shared (LocalBlackBox after_input)": lambda p: shared.logits(p, data),
        "batched, prompt first (LocalBlackBox start; other function)": lambda p: start_bb.logits(p, data_start),
    }
    if args.skip_start:
        paths = {k: v for k, v in paths.items() if "other function" not in k}
    results, scores = {}, {}
    for name, fn in paths.items():
        fn(prompts_per_gen[0][:2])  # warm-up
        start, cpu = time.perf_counter(), time.process_time()
        scores[name] = [fn(p) for p in prompts_per_gen]
        n_gen = len(prompts_per_gen)
        results[name] = {
            "seconds_per_generation": (time.perf_counter() - start) / n_gen,
            # CPU time of this process: less sensitive than wall time to other jobs on a shared machine
            "cpu_seconds_per_generation": (time.process_time() - cpu) / n_gen,
        }
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    base_name = next(iter(paths))
    base = results[base_name]["seconds_per_generation"]
    base_cpu = results[base_name]["cpu_seconds_per_generation"]
    for name in paths:
        results[name]["speedup_vs_serial"] = base / results[name]["seconds_per_generation"]
        results[name]["cpu_speedup_vs_serial"] = base_cpu / results[name]["cpu_seconds_per_generation"]
        if "other function" not in name:
            diff = max(float((a - b).abs().max()) for a, b in zip(scores[name], scores[base_name]))
            results[name]["max_abs_score_diff_vs_serial"] = diff
    lengths = [len(t) for t in inputs]
    report = {
        "args": vars(args),
        "threads": torch.get_num_threads(),
        "examples": len(inputs),
        "input_tokens_mean": float(np.mean(lengths)),
        "tail_tokens": len(tail),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
