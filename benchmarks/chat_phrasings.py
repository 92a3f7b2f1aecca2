"""Choose a task's chat phrasing for ``--scoring chat`` on seeded *training* examples (test is never read).

Starts ``bbfl serve --model smollm2`` here (or uses ``--base-url``) and scores each candidate phrasing
zero-shot through the real HTTP path BDPL and FedOne use: the filled template is the user's message, the
answer is the assistant's first token, and a class's score is the summed probability of the top-20 tokens
that equal its label word (``OpenAIBlackBox(scoring="chat")``). Prints accuracy, each class's share of
the predictions, and how often no label word was among the top 20 (every class at the floor).

    python benchmarks/chat_phrasings.py --task agnews --data-dir ../shared/data/agnews

The phrasing with the best training accuracy goes into ``examples/specs/<task>-chat.toml``.
Label words must be single tokens of the model (the chat scorer compares whole tokens): on SmolLM2
"World", "Sports", "Business", "Technology" are; "sports" in lower case is not ("s" + "ports").
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from bbfl.blackbox.openai import OpenAIBlackBox
from bbfl.data import load_task
from bbfl.methods.losses import accuracy
from bbfl.serve import spawn_server

QUESTION = "Answer with one word."
CANDIDATES = {
    "agnews": [
        (
            "What is the topic of this news article: World, Sports, Business or Technology? "
            f"{QUESTION}\nArticle: {{text}}{{mask}}",
            ["World", "Sports", "Business", "Technology"],
        ),
        (
            f"Article: {{text}}\nIs this news article about World, Sports, Business or Technology? {QUESTION}{{mask}}",
            ["World", "Sports", "Business", "Technology"],
        ),
        (
            f"Classify this news article as World, Sports, Business or Science. {QUESTION}\nArticle: {{text}}{{mask}}",
            ["World", "Sports", "Business", "Science"],
        ),
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="agnews", choices=sorted(CANDIDATES))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--base-url", default=None, help="default: start `bbfl serve --model MODEL` here")
    ap.add_argument("--max-length", type=int, default=384, help="the server's token limit (longer: refused)")
    ap.add_argument("--n", type=int, default=64, help="training examples scored per candidate")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    server, base_url = None, args.base_url
    if base_url is None:  # a first load converts the GGUF file: allow it minutes
        server, url = spawn_server(["--model", args.model, "--max-length", str(args.max_length)], timeout=300)
        base_url = f"{url}/v1"
    try:
        with tempfile.TemporaryDirectory() as cache:
            for template, words in CANDIDATES[args.task]:
                task = load_task(args.task, data_dir=args.data_dir, template=template, label_words=words)
                rows = np.random.default_rng(args.seed).choice(len(task.train), args.n, replace=False)
                split = task.train.subset(rows)
                bb = OpenAIBlackBox(
                    args.model, base_url=base_url, api_key="x", scoring="chat", mask_text="",
                    concurrency=args.concurrency, cache_dir=cache,
                )  # fmt: skip
                start = time.perf_counter()
                data = bb.encode(task, split)
                scores = bb.logits(None, data)[0]
                acc = float(accuracy(scores[None], data.labels)[0])
                predicted = np.bincount(scores.argmax(-1).numpy(), minlength=len(words)) / len(split)
                floor = float((scores.max(-1).values <= np.log(bb.label_floor) + 1e-6).float().mean())
                shares = " / ".join(f"{w} {p:.0%}" for w, p in zip(words, predicted))
                print(f"{acc:.3f}  {template!r}  predicted: {shares}  no label word in top 20: {floor:.0%}  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    finally:
        if server is not None:
            server.terminate()


if __name__ == "__main__":
    main()
