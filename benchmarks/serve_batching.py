"""What batching concurrent requests on the server buys: `bbfl serve` with and without it.

Starts `bbfl serve` twice on the same model (a subprocess each, killed at the end): once with batching
off (``--max-batch-texts 1 --batch-wait-ms 0``: one forward per request, the old behaviour) and once
with the defaults, and sends the same N single-text ``/v1/embeddings`` requests through the real
``openai`` client from C client threads, the way :class:`~bbfl.blackbox.openai.OpenAIBlackBox`
scores one text per request. Reports requests per second, model calls per request (from
``/health``) and checks that both servers return the same vectors.

    python benchmarks/serve_batching.py                        # embedded MiniLM, 256 requests, 16 threads
    python benchmarks/serve_batching.py --requests 512 --concurrency 32 --threads 2
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from bbfl.data import load_task
from bbfl.serve import spawn_server

SETTINGS = {"one request per forward": ["--max-batch-texts", "1", "--batch-wait-ms", "0"], "batched (defaults)": []}


def measure(args: argparse.Namespace, texts: list[str], flags: list[str]) -> dict:
    import openai

    token = os.urandom(16).hex()
    model = ["--model", args.model] if args.model else []
    proc, url = spawn_server([*model, *flags], token=token, threads=args.threads)
    try:
        client = openai.OpenAI(api_key=token, base_url=f"{url}/v1", max_retries=0)

        def embed(text: str) -> np.ndarray:
            return np.asarray(
                client.embeddings.create(model="m", input=text, encoding_format="float").data[0].embedding
            )

        embed("warm-up")
        before = httpx.get(f"{url}/health").json()["batching"]["embeddings"]
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            vectors = list(pool.map(embed, texts))
        seconds = time.perf_counter() - start
        after = httpx.get(f"{url}/health").json()["batching"]["embeddings"]
    finally:
        proc.terminate()
        proc.wait()
    calls = after["model_calls"] - before["model_calls"]
    return {
        "seconds": seconds,
        "rps": len(texts) / seconds,
        "calls_per_request": calls / len(texts),
        "vectors": vectors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="local model dir (default: embedded MiniLM)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16, help="client threads sending at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    args = parser.parse_args()
    task = load_task("demo")
    texts = [task.train.texts[i % len(task.train)] for i in range(args.requests)]
    results = {name: measure(args, texts, flags) for name, flags in SETTINGS.items()}
    first, second = (r["vectors"] for r in results.values())
    diff = max(float(np.abs(a - b).max()) for a, b in zip(first, second))
    print(
        f"{args.requests} single-text /v1/embeddings requests from {args.concurrency} threads, "
        f"server torch threads {args.threads}"
    )
    print("| server | requests/s | model calls per request | wall s |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rps']:.1f} | {r['calls_per_request']:.3f} | {r['seconds']:.2f} |")
    print(f"max |difference| between the two servers' vectors: {diff:.2e}")


if __name__ == "__main__":
    main()
