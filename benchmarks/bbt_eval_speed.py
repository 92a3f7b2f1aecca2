"""Time per CMA-ES generation: bbfl's population evaluation vs. the official BBT loop.

The official loop (txsun1997/Black-Box-Tuning, bbt.py) scores the population one candidate at a
time: for each candidate, one forward over the whole train set padded to its longest example, fp32,
prompt concatenated to every example. bbfl scores all candidates in one call, length-bucketed, and
(``prefix`` attention) runs the prompt stream once per candidate. We time both on the same candidates
from CMA-ES, report the ratio, and check the scores: ``full`` must match the official loop exactly;
``prefix`` is a different attention pattern, so ``--accuracy-budget`` runs a short BBT with each
path and reports test accuracy.

    python benchmarks/bbt_eval_speed.py --data-dir ../shared/data/sst2          # CPU, MiniLM
    python benchmarks/bbt_eval_speed.py --data-dir ../shared/data/sst2 --accuracy-budget 400
    python benchmarks/bbt_eval_speed.py --device cuda --arch roberta-large --dtype bfloat16 \
        --data-dir ../shared/data/sst2 --full-run        # GPU: 8,000-query run time too
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from bbfl.blackbox import Encoded, LocalBlackBox
from bbfl.data import few_shot, load_task
from bbfl.methods.bbt import BBTConfig, SubspaceProjection, evaluate_prompt, run_bbt
from bbfl.optim import CMAES


class OfficialLoop:
    """The official evaluation pattern on top of a LocalBlackBox's model and head."""

    def __init__(self, bb: LocalBlackBox) -> None:
        self.bb = bb
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
        out = []
        for prompt in prompts.to(bb.device, torch.float32):  # one candidate at a time
            with self.counter.charge(queries=1, examples=len(ids), tokens=input_ids.numel()):
                hidden = bb._full_encode(prompt[None].to(bb.dtype), input_ids, mask, bb._insert_at())
                out.append(bb._read_out(hidden, mask, read_at)[0].float())
            if bb.device.type == "cuda":
                torch.cuda.synchronize()
        return torch.stack(out)


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
    paths = {
        "official loop (serial, padded, fp32, full attention)": ("official", "full", "float32"),
        f"bbfl batched, full attention, {args.dtype}": ("bbfl", "full", args.dtype),
        f"bbfl batched, prefix attention, {args.dtype}": ("bbfl", "prefix", args.dtype),
    }
    cfg = BBTConfig(prompt_length=args.prompt_length, popsize=args.popsize, seed=args.seed)
    results, scores = {}, {}
    prompts_per_gen = None
    for name, (kind, attention, dtype) in paths.items():
        bb = LocalBlackBox(model_dir, head=head, device=args.device, dtype=dtype, prompt_attention=attention)
        data = bb.encode(task, train)
        if prompts_per_gen is None:  # the same candidates for every path
            p0 = bb.token_embeddings(cfg.prompt_init, cfg.prompt_length)
            projection = SubspaceProjection(cfg.intrinsic_dim, p0, bb.embedding_std, seed=args.seed)
            es = CMAES(np.zeros(cfg.intrinsic_dim), cfg.sigma0, cfg.popsize, seed=args.seed)
            prompts_per_gen = [projection(es.ask()) for _ in range(args.generations)]
        scorer = OfficialLoop(bb) if kind == "official" else bb
        seconds, outs = time_generations(scorer.logits, prompts_per_gen, data)
        scores[name] = outs
        results[name] = {"seconds_per_generation": seconds}
        if args.accuracy_budget:
            results[name].update(short_bbt(scorer, bb, task, train, dev, args, cfg))
        print(f"{name}: {seconds:.3f} s/generation", flush=True)
        del bb, scorer
    names = list(paths)
    base = results[names[0]]["seconds_per_generation"]
    for name in names:
        results[name]["speedup_vs_official"] = base / results[name]["seconds_per_generation"]
        diff = max(float((a - b).abs().max()) for a, b in zip(scores[name], scores[names[0]]))
        results[name]["max_abs_score_diff_vs_official"] = diff
    if args.full_run:
        results["full_run_8000_queries_seconds"] = full_run(model_dir, head, task, train, dev, args)
    report = {
        "args": vars(args),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def short_bbt(scorer, bb, task, train, dev, args, cfg) -> dict:
    train_e, dev_e = bb.encode(task, train), bb.encode(task, dev)
    test_e = bb.encode(task, task.test.head(args.test_limit))
    p0 = bb.token_embeddings(cfg.prompt_init, cfg.prompt_length)
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
    bb = LocalBlackBox(model_dir, head=head, device=args.device, dtype=args.dtype, prompt_attention="prefix")
    cfg = BBTConfig(prompt_length=args.prompt_length, popsize=args.popsize, budget=8000, seed=args.seed)
    p0 = bb.token_embeddings(cfg.prompt_init, cfg.prompt_length)
    projection = SubspaceProjection(cfg.intrinsic_dim, p0, bb.embedding_std, seed=args.seed)
    train_e, dev_e = bb.encode(task, train), bb.encode(task, dev)
    start = time.perf_counter()
    run_bbt(cfg, bb, train_e, dev_e, projection, task.loss)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
