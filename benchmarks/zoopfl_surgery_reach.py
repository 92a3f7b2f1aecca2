"""How far can ZooPFL's input surgery move the black box? The decoded prefix's scale and the predictions it changes.

The surgery writes p0 + D [u, e_c] in front of each example, with D the fixed random decoder (BBT's
projection scaling). This scores SST-2 dev with the prefix p0 alone and with codes from the untrained
encoder, uniform codes in [-1, 1] and saturated +-1 codes (u is a tanh, so +-1 is as far as the shared
latent can reach), and counts the predictions that change — an upper bound on what training can do
at this decoder scale, whatever the learning rate or the zeroth-order estimate.

    python benchmarks/zoopfl_surgery_reach.py --data-dir ../shared/data/sst2
    python benchmarks/zoopfl_surgery_reach.py --data-dir ../shared/data/sst2 --alpha 4
"""

from __future__ import annotations

import argparse

import torch

from bbfl.blackbox import LocalBlackBox
from bbfl.data import load_task
from bbfl.methods.zoopfl import ZooPFLConfig
from bbfl.methods.zoopfl.method import decode_prefixes, example_features, fixed_decoder, new_encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--alpha", type=float, default=1.0, help="decoder scale (ZooPFLConfig.alpha)")
    ap.add_argument("--prompt-length", type=int, default=5)
    args = ap.parse_args()

    blackbox = LocalBlackBox()
    task = load_task(args.task, data_dir=args.data_dir)
    test = blackbox.encode(task, task.test)
    cfg = ZooPFLConfig(alpha=args.alpha, prompt_length=args.prompt_length)
    dim = cfg.code_dim
    decoder = fixed_decoder(cfg, blackbox)  # ZooPFL's own (same seed, same scaling)
    p0 = blackbox.token_embeddings(".", cfg.prompt_length).cpu()
    n = len(task.test)

    def predictions(codes: torch.Tensor) -> tuple[torch.Tensor, float]:
        with torch.inference_mode():
            scores = blackbox.paired_logits(decode_prefixes(codes, decoder, p0)[None], test)[0].cpu()
        predicted = scores.argmax(-1)
        return predicted, float((predicted == test.labels.cpu()).float().mean())

    base, base_acc = predictions(torch.zeros(n, dim))
    with torch.no_grad():
        encoder = new_encoder(blackbox.hidden_size, cfg, seed=cfg.seed)
        at_init = torch.cat([encoder(example_features(blackbox, test)), torch.zeros(n, cfg.client_embed_dim)], 1)
    rng = torch.Generator().manual_seed(0)
    cases = {
        "untrained encoder": at_init,
        "uniform codes in [-1, 1]": torch.rand(n, dim, generator=rng) * 2 - 1,
        "saturated codes +-1": torch.sign(torch.randn(n, dim, generator=rng)),
    }
    token = float(p0.norm(dim=-1).mean())
    print(f"{args.task}, {n} examples, alpha {cfg.alpha}, L {cfg.prompt_length}: p0 alone {100 * base_acc:.2f}%")
    print("| codes | mean \\|code\\| | decoded token / \\|p0 token\\| | predictions changed | accuracy |")
    print("|---|---|---|---|---|")
    for name, codes in cases.items():
        decoded = float((decode_prefixes(codes, decoder, p0) - p0).norm(dim=-1).mean())
        predicted, acc = predictions(codes)
        changed = int((predicted != base).sum())
        print(
            f"| {name} | {float(codes.norm(dim=-1).mean()):.2f} | {decoded / token:.2f} | {changed} / {n} | "
            f"{100 * acc:.2f} |"
        )


if __name__ == "__main__":
    main()
