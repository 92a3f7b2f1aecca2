"""Choose a task's causal template for a causal LM on seeded *training* examples (the test split is never read).

Each candidate phrasing (template + label words) is scored zero-shot on the same ``--n`` training examples
drawn at random; the accuracy and the share of each predicted class are printed. The registry's AG News
causal template was chosen this way (SmolLM2-135M-Instruct, 200 examples, seed 11; one shared core):

    python benchmarks/causal_templates.py --task agnews --data-dir ../shared/data/agnews

    0.580  'Article: {text}\\nTopic: {mask}'              World / Sports / Business / Technology
    0.600  'News: {text}\\nCategory: {mask}'              World / Sports / Business / Science
    0.755  '{text}\\nThis news article is about {mask}'   world / sports / business / technology  (chosen)
    0.590  'Article: {text}\\nTopic: {mask}'              Politics / Sports / Business / Technology
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bbfl.blackbox import LocalBlackBox
from bbfl.data import load_task

CANDIDATES = {
    "agnews": [
        ("Article: {text}\nTopic: {mask}", ["World", "Sports", "Business", "Technology"]),
        ("News: {text}\nCategory: {mask}", ["World", "Sports", "Business", "Science"]),
        ("{text}\nThis news article is about {mask}", ["world", "sports", "business", "technology"]),
        ("Article: {text}\nTopic: {mask}", ["Politics", "Sports", "Business", "Technology"]),
    ],
    "sst2": [
        ("Review: {text}\nSentiment: {mask}", ["negative", "positive"]),
        ("{text} Overall, the movie was {mask}", ["bad", "good"]),
        ("{text} . It was {mask} .", ["bad", "great"]),
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="agnews", choices=sorted(CANDIDATES))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=200, help="training examples scored per candidate")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bb = LocalBlackBox(args.model, max_length=args.max_length)
    for template, words in CANDIDATES[args.task]:
        # template and words given: the user's phrasing, read as is by every head
        task = load_task(args.task, data_dir=args.data_dir, template=template, label_words=words)
        rows = np.random.default_rng(args.seed).choice(len(task.train), args.n, replace=False)
        split = task.train.subset(rows)
        start = time.perf_counter()
        data = bb.encode(task, split)
        with torch.inference_mode():
            pred = bb.logits(None, data)[0].argmax(-1)
        acc = float((pred == data.labels).float().mean())
        share = np.bincount(pred.cpu().numpy(), minlength=task.num_classes) / len(pred)
        print(
            f"{acc:.3f}  {template!r}  {' / '.join(words)}  predicted shares {share.round(2).tolist()}  "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
