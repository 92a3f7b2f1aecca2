"""What ending a chunk at padding waste buys: :class:`~bbfl.blackbox.LocalBlackBox` forwards with and without it.

``LocalBlackBox.forward`` sorts the examples by length and runs them in chunks of at most ``max_tokens``
padded cells. A chunk also ends, once it holds ``MIN_CHUNK_TOKENS`` cells, where the next example would
make more than ``MAX_PADDING_RATIO`` padded cells per real one (``bbfl/blackbox/chunking.py``). Without
that rule (``MAX_PADDING_RATIO = inf``, the old behaviour) one prompt over a test set, or a whole CMA-ES
population over 32 examples, ran as one or two forwards padded to the longest example. The same function
at the same precision either way; the scores are compared and each path is timed twice, alternating.

Cases: a CMA-ES population (20 random prompts, L = 10) over 32 seeded training examples; one empty prompt
over a seeded sample of test examples (the test pass every method makes).

    python benchmarks/padding_chunks.py --threads 2
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

import bbfl.blackbox.chunking as chunking
from bbfl.data import load_task
from bbfl.experiment import BlackBoxConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CASES = [  # (model, prompt position, task, population or None = one empty prompt, examples)
    ("minilm", "start", "sst2", 20, 32),
    ("smollm2", "after_input", "sst2", 20, 32),
    ("smollm2", "after_input", "agnews", 20, 32),
    ("smollm2", "start", "agnews", None, 500),
]


def time_forward(bb, prompts, enc, ratio: float) -> tuple[float, torch.Tensor]:
    chunking.MAX_PADDING_RATIO = ratio
    start = time.perf_counter()
    with torch.inference_mode():
        scores = bb.forward(prompts, enc)
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--data-root", default=str(DATA))
    parser.add_argument("--cases", type=int, nargs="+", default=list(range(len(CASES))), help="rows to run (0-based)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = chunking.MAX_PADDING_RATIO
    print(f"{args.threads} thread(s), max_tokens 32768, MIN_CHUNK_TOKENS {chunking.MIN_CHUNK_TOKENS}")
    header = "| model, placement, task | scored | max_tokens only (s) | padding-bounded (s) | speed-up | max diff |"
    print(header)
    print("|---|---|---|---|---|---|")
    for model, position, task_name, population, n in (CASES[i] for i in args.cases):
        bb = BlackBoxConfig(
            None if model == "minilm" else model, max_length=args.max_length, prompt_position=position
        ).build()
        task = load_task(task_name, data_dir=f"{args.data_root}/{task_name}")
        split = task.train if population else task.test
        enc = bb.encode(task, split.subset(random.Random(0).sample(range(len(split)), n)))
        seeded = torch.Generator().manual_seed(0)
        prompts = torch.randn(population, 10, bb.hidden_size, generator=seeded) * 0.01 if population else None
        times: dict[float, list[float]] = {float("inf"): [], default: []}
        scores = {}
        for _ in range(2):
            for ratio in times:
                seconds, scores[ratio] = time_forward(bb, prompts, enc, ratio)
                times[ratio].append(seconds)
        chunking.MAX_PADDING_RATIO = default
        old, new = (statistics.median(v) for v in times.values())
        diff = float((scores[float("inf")] - scores[default]).abs().max())
        scored = f"{population} prompts x {n}" if population else f"1 prompt x {n}"
        cells = f"{old:.2f} | {new:.2f} | {old / new:.2f}x | {diff:.1e}"
        print(f"| {model}, {position}, {task_name} | {scored} | {cells} |")


if __name__ == "__main__":
    main()
