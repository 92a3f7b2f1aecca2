"""What serving a model over HTTP costs per BBT query: `bbfl serve` + RemoteBlackBox vs. LocalBlackBox.

Starts `bbfl serve` on a free port (a subprocess, killed at the end), then times the same calls
both ways on the same model and the demo task: a CMA-ES population of P candidates on B examples
(BBT's shape: one call = P queries), repeated. The overhead per query is
(remote - local) / P; a bare authenticated round trip (`GET /v1/bbfl/info`) and the request /
response sizes are reported too, and the scores are checked to be identical.

    python benchmarks/remote_overhead.py                       # embedded MiniLM, P = 20, B = 16
    python benchmarks/remote_overhead.py --popsize 5 --repeats 20
    python benchmarks/remote_overhead.py --model path/to/model --threads 4

Both processes run with ``--threads`` torch threads, so on a shared machine the local and remote
forwards use the same compute; the numbers are wall-clock medians of calls timed in turns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import numpy as np
import torch

from bbfl.blackbox import LocalBlackBox
from bbfl.blackbox.remote import RemoteBlackBox, pack
from bbfl.data import few_shot, load_task
from bbfl.serve import spawn_server


def interleaved_medians(fns: list, repeats: int) -> list[float]:
    """Median wall-clock of each function, timed in turns so that a load change on a shared machine hits all alike."""
    for fn in fns:
        fn()  # warm-up (tokenization caches, allocator)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="local model dir (default: embedded MiniLM)")
    parser.add_argument("--popsize", type=int, default=20)
    parser.add_argument("--k-shot", type=int, default=8, help="examples per class (demo: 2 classes)")
    parser.add_argument("--prompt-length", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    token = os.urandom(16).hex()
    server, url = spawn_server(["--model", args.model] if args.model else [], token=token, threads=args.threads)
    try:
        local = LocalBlackBox(args.model)
        remote = RemoteBlackBox(url, token=token)
        task = load_task("demo")
        train, _ = few_shot(task.train, args.k_shot, seed=0)
        gen = torch.Generator().manual_seed(0)
        prompts = local.token_embeddings(".", args.prompt_length)[None].repeat(args.popsize, 1, 1)
        prompts = prompts + local.embedding_std * torch.randn(prompts.shape, generator=gen)
        data_l, data_r = local.encode(task, train), remote.encode(task, train)
        same = torch.equal(local.logits(prompts, data_l), remote.logits(prompts, data_r))
        t_local, t_remote = interleaved_medians(
            [lambda: local.logits(prompts, data_l), lambda: remote.logits(prompts, data_r)], args.repeats
        )
        (t_ping,) = interleaved_medians([lambda: remote._request("GET", "/v1/bbfl/info")], args.repeats * 5)
        request_bytes = len(pack({"prompts": prompts.float()}, data_r.request_meta()))
        result = {
            "model": local.model_name,
            "popsize": args.popsize,
            "examples": len(train),
            "prompt_length": args.prompt_length,
            "threads": args.threads,
            "identical_scores": same,
            "local_s_per_call": round(t_local, 4),
            "remote_s_per_call": round(t_remote, 4),
            "overhead_ms_per_call": round(1000 * (t_remote - t_local), 2),
            "overhead_ms_per_query": round(1000 * (t_remote - t_local) / args.popsize, 2),
            "overhead_fraction": round((t_remote - t_local) / t_local, 3),
            "round_trip_ms": round(1000 * t_ping, 2),
            "request_bytes": request_bytes,
            "response_bytes": len(pack({"scores": torch.zeros(args.popsize, len(train), task.num_classes)})),
        }
        print(json.dumps(result, indent=2))
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
