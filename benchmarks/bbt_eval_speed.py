"""Time per CMA-ES generation: bbfl's population evaluation vs. the official BBT code's two modes.

The official bbt.py (txsun1997/Black-Box-Tuning) has two evaluation modes, and both are baselines:

* serial (default): one forward per candidate over the whole train set padded to its longest example;
* ``--parallel``: the train set repeated popsize times, all candidates in ONE forward, still padded
  to the longest example.

The headline is the like-for-like ratio: bbfl's batched ``full`` attention (the paper's function;
length-bucketed, no padding waste) against both official modes, at the same precision (``--dtype``
applies to all three) on the same CMA-ES candidates; the scores must agree. ``prefix`` attention
(prompt tokens read only each other) is a *different function*: its time and, with
``--accuracy-budget``, its accuracy are reported on their own, never as the speed-up of BBT.

    python benchmarks/bbt_eval_speed.py --data-dir ../shared/data/sst2          # CPU, MiniLM
    python benchmarks/bbt_eval_speed.py --data-dir ../shared/data/sst2 --accuracy-budget 400
    python benchmarks/bbt_eval_speed.py --device cuda --arch roberta-large --dtype bfloat16 \
        --data-dir ../shared/data/sst2 --full-run        # GPU: 8,000-query run time too (full attention)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from bbfl.blackbox import Encoded, LocalBlackBox
from bbfl.blackbox.placement import prompt_origin
from bbfl.data import few_shot, load_task
from bbfl.methods.bbt import BBTConfig, SubspaceProjection, evaluate_prompt, run_bbt
from bbfl.optim import CMAES


class OfficialLoop:
    """The official evaluation pattern on top of a LocalBlackBox's model and head.

    ``parallel=False``: bbt.py's default, one candidate per forward; ``parallel=True``: its
    ``--parallel`` mode, the whole population in one forward over the repeated, padded train set.
    """

    def __init__(self, bb: LocalBlackBox, parallel: bool = False) -> None:
        self.bb, self.parallel = bb, parallel
        self.counter = bb.counter

    @torch.inference_mode()
    def logits(self, prompts: torch.Tensor | None, data: Encoded) -> torch.Tensor:
        bb = self.bb
        if prompts is None:
            prompts = torch.zeros(1, 0, bb.hidden_size)
        ids = [data.input_ids[i] for i in torch.argsort(data.order).tolist()]  # original order
        input_ids = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=bb._pad_id())
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(t) for t in ids], batch_first=True)
        read_at = data.read_at[torch.argsort(data.order)]
        prompts = prompts.to(bb.device, bb.dtype)
        groups = [prompts] if self.parallel else [p[None] for p in prompts]  # all at once, or one at a time
        out = []
        for group in groups:
            with self.counter.charge(queries=len(group), examples=len(group) * len(ids), tokens=input_ids.numel()):
                hidden = bb._full_encode(group, input_ids, mask, bb._insert_at())
                out.append(bb._read_out(hidden, mask, read_at).float())
            if bb.device.type == "cuda":
                torch.cuda.synchronize()
        return torch.cat(out)


def build_model_dir(arch: str) -> str | None:
    """A random-weight model of a published shape (no download needed), saved to a temp dir."""
    if arch == "minilm":
        return None
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    from bbfl.blackbox import default_model_path

    shapes = {
        "roberta-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    }
    tok = AutoTokenizer.from_pretrained(default_model_path())
    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, pad_token_id=tok.pad_token_id, **shapes[arch])
    path = tempfile.mkdtemp(prefix=f"bbfl-{arch}-")
    RobertaForMaskedLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def time_generations(fn, prompts_per_gen: list[torch.Tensor], data: Encoded) -> tuple[float, list[torch.Tensor]]:
    fn(prompts_per_gen[0][:2], data)  # warm-up
    outs, start = [], time.perf_counter()
    for prompts in prompts_per_gen:
        outs.append(fn(prompts, data))
    return (time.perf_counter() - start) / len(prompts_per_gen), outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--arch", default="minilm", choices=["minilm", "roberta-large"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--k-shot", type=int, default=16)
    ap.add_argument("--prompt-length", type=int, default=50)
    ap.add_argument("--popsize", type=int, default=20)
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--accuracy-budget", type=int, default=0, help="also run BBT with each path (queries)")
    ap.add_argument("--test-limit", type=int, default=872)
    ap.add_argument("--full-run", action="store_true", help="time an 8,000-query BBT run on the fast path")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()

    task = load_task(args.task, data_dir=args.data_dir)
    train, dev = few_shot(task.train, args.k_shot, seed=args.seed)
    model_dir = build_model_dir(args.arch)
    head = "mlm" if args.arch != "minilm" else "auto"
    official_serial = f"official serial (one candidate per forward, padded), full attention, {args.dtype}"
    official_parallel = f"official --parallel (population in one padded forward), full attention, {args.dtype}"
    bbfl_full = f"bbfl batched, full attention, {args.dtype}"
    bbfl_prefix = f"bbfl batched, prefix attention (a different function), {args.dtype}"
    paths = {
        official_serial: ("official", "full", args.dtype),
        official_parallel: ("parallel", "full", args.dtype),
        bbfl_full: ("bbfl", "full", args.dtype),
        bbfl_prefix: ("bbfl", "prefix", args.dtype),
    }
    cfg = BBTConfig(prompt_length=args.prompt_length, popsize=args.popsize, seed=args.seed)
    results, scores = {}, {}
    prompts_per_gen = None
    for name, (kind, attention, dtype) in paths.items():
        bb = LocalBlackBox(model_dir, head=head, device=args.device, dtype=dtype, prompt_attention=attention)
        data = bb.encode(task, train)
        if prompts_per_gen is None:  # the same candidates for every path
            p0 = prompt_origin(bb, cfg.prompt_init, cfg.prompt_length)
            projection = SubspaceProjection(cfg.intrinsic_dim, p0, bb.embedding_std, seed=args.seed)
            es = CMAES(np.zeros(cfg.intrinsic_dim), cfg.sigma0, cfg.popsize, seed=args.seed)
            prompts_per_gen = [projection(es.ask()) for _ in range(args.generations)]
        scorer = OfficialLoop(bb, parallel=kind == "parallel") if kind in ("official", "parallel") else bb
        seconds, outs = time_generations(scorer.logits, prompts_per_gen, data)
        scores[name] = outs
        results[name] = {"seconds_per_generation": seconds}
        if args.accuracy_budget:
            results[name].update(short_bbt(scorer, bb, task, train, dev, args, cfg))
        print(f"{name}: {seconds:.3f} s/generation", flush=True)
        results[name]["placement"] = bb.prompt_placement
        del bb, scorer
    for name in paths:
        for base, key in ((official_serial, "vs_official_serial"), (official_parallel, "vs_official_parallel")):
            results[name][f"speedup_{key}"] = (
                results[base]["seconds_per_generation"] / results[name]["seconds_per_generation"]
            )
        diff = max(float((a - b).abs().max()) for a, b in zip(scores[name], scores[official_serial]))
        results[name]["max_abs_score_diff_vs_official"] = diff
    headline = {
        "like_for_like (bbfl full vs official, same function and precision)": {
            "vs_serial": results[bbfl_full]["speedup_vs_official_serial"],
            "vs_parallel": results[bbfl_full]["speedup_vs_official_parallel"],
        },
        "prefix (different function) vs official parallel": results[bbfl_prefix]["speedup_vs_official_parallel"],
    }
    if args.full_run:
        results["full_run_8000_queries_seconds"] = full_run(model_dir, head, task, train, dev, args)
    report = {
        "args": vars(args),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "headline": headline,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def short_bbt(scorer, bb, task, train, dev, args, cfg) -> dict:
    train_e, dev_e = bb.encode(task, train), bb.encode(task, dev)
    test_e = bb.encode(task, task.test.head(args.test_limit))
    p0 = prompt_origin(bb, cfg.prompt_init, cfg.prompt_length)
    projection = SubspaceProjection(cfg.intrinsic_dim, p0, bb.embedding_std, seed=args.seed)
    run_cfg = BBTConfig(
        prompt_length=args.prompt_length, popsize=args.popsize, budget=args.accuracy_budget, seed=args.seed
    )
    start = time.perf_counter()
    result = run_bbt(run_cfg, scorer, train_e, dev_e, projection, task.loss)
    seconds = time.perf_counter() - start
    acc, _ = evaluate_prompt(bb, projection(result.z_best), test_e)
    start_acc, _ = evaluate_prompt(bb, p0, test_e)
    return {"bbt_test_accuracy": acc, "start_test_accuracy": start_acc, "bbt_seconds": seconds}


def full_run(model_dir, head, task, train, dev, args) -> float:
    bb = LocalBlackBox(model_dir, head=head, device=args.device, dtype=args.dtype, prompt_attention="full")
    cfg = BBTConfig(prompt_length=args.prompt_length, popsize=args.popsize, budget=8000, seed=args.seed)
    p0 = prompt_origin(bb, cfg.prompt_init, cfg.prompt_length)
    projection = SubspaceProjection(cfg.intrinsic_dim, p0, bb.embedding_std, seed=args.seed)
    train_e, dev_e = bb.encode(task, train), bb.encode(task, dev)
    start = time.perf_counter()
    run_bbt(cfg, bb, train_e, dev_e, projection, task.loss)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
