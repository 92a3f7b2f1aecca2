"""What `bbfl serve`'s next-token batching costs: grouped by length and read at one position vs. one padded forward.

Concurrent chat / completions requests are merged into one batch. The server's
:meth:`~bbfl.serve.server.Server._next_token_logprobs` runs that batch sorted by length, cut by
:func:`~bbfl.blackbox.chunking.chunks` (at most ``next_token_group_tokens`` padded tokens per forward), and
sends only each text's last position through the output layer. The reference here is the plain way: one
forward of the whole batch right-padded to its longest text, all [N, T, V] logits, then the row after each
text's end. Both give the same function (fp32 log-probabilities of the next token); the benchmark checks
that and times each, alternating, on N real AG News training articles in the chat phrasing of
``examples/specs/agnews-chat.toml`` through the model's chat template.

    OMP_NUM_THREADS=1 python benchmarks/serve_next_token.py --model smollm2 --texts 48
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from bbfl.data import load_task
from bbfl.experiment import BlackBoxConfig
from bbfl.serve import ServeLimits, Server

ROOT = Path(__file__).resolve().parents[1]
QUESTION = (
    "What is the topic of this news article: World, Sports, Business or Technology? Answer with one word.\n"
    "Article: {text}"
)


def padded_reference(bb, sequences: list[list[int]]) -> torch.Tensor:
    """[N, V] next-token log-probabilities from one right-padded forward with all logits."""
    ids = torch.full((len(sequences), max(map(len, sequences))), bb._pad_id(), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)], attn[i, : len(seq)] = torch.tensor(seq), 1
    with torch.inference_mode():
        logits = bb.model(input_ids=ids, attention_mask=attn).logits
        return torch.log_softmax(logits[torch.arange(len(sequences)), attn.sum(1) - 1].float(), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "agnews"))
    parser.add_argument("--texts", type=int, default=48, help="texts in the merged batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="which training articles (a seeded sample)")
    args = parser.parse_args()

    bb = BlackBoxConfig(args.model, max_length=512).build()
    server = Server(bb, None, ServeLimits())
    task = load_task("agnews", data_dir=args.data_dir)
    rows = random.Random(args.seed).sample(range(len(task.train)), args.texts)
    texts = [
        server._chat_prompt([{"role": "user", "content": QUESTION.format(text=task.train.texts[i])}]) for i in rows
    ]
    sequences = [bb.tokenizer(t)["input_ids"] for t in texts]
    lengths = sorted(map(len, sequences))
    shape = f"{len(texts)} chat prompts of {lengths[0]}-{lengths[-1]} tokens"
    print(f"{args.model}, {torch.get_num_threads()} thread(s), {shape}")

    grouped = torch.stack(server._next_token_logprobs(sequences))
    diff = float((grouped - padded_reference(bb, sequences)).abs().max())
    times: dict[str, list[float]] = {"one padded forward, all logits": [], "length groups, last position only": []}
    for _ in range(args.repeats):
        for name, run in zip(
            times, (lambda: padded_reference(bb, sequences), lambda: server._next_token_logprobs(sequences))
        ):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:36s} median {statistics.median(values):6.2f} s  runs {', '.join(f'{v:.2f}' for v in values)}")
    ratio = statistics.median(times["one padded forward, all logits"]) / statistics.median(
        times["length groups, last position only"]
    )
    print(f"speed-up {ratio:.2f}x; max |log-prob difference| {diff:.1e}")


if __name__ == "__main__":
    main()
