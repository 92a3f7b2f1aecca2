"""A small FedOne for tests that need a cheap real federated method (no model, no server).

FedOne's black box is a text API; :class:`KeywordBox` scores a prompt by whether it holds "magic"
(it counts queries like any black box), so a FedOne round runs in milliseconds.
"""

from __future__ import annotations

import torch


class KeywordBox:
    """A tiny text black box: it knows the label only when the prompt holds "magic"."""

    def __init__(self) -> None:
        from bbfl.blackbox import QueryCounter

        self.counter = QueryCounter()

    def logits(self, prompts: list[str], data) -> torch.Tensor:
        with self.counter.charge(queries=len(prompts), examples=len(prompts) * len(data), tokens=0):
            onehot = torch.nn.functional.one_hot(data.labels, 2).float()
            return torch.stack([2.0 * onehot * ("magic" in p.split()) for p in prompts])


def text_batch(n: int, offset: int = 0):
    from bbfl.blackbox.openai import TextBatch

    labels = torch.tensor([(i + offset) % 2 for i in range(n)])
    return TextBatch([f"example {i}" for i in range(n)], labels, ["bad", "good"], ["bad.", "good."])


def small_fedone(num_clients: int = 3, local_steps: int = 2):
    """FedOne over ``num_clients`` clients of 4 examples, a 4-word vocabulary, prompts of 2 words."""
    from bbfl.methods.bdpl import BDPLConfig, FedOne

    vocab = ["alpha", "beta", "magic", "omega"]
    cfg = BDPLConfig(prompt_length=2, num_candidates=len(vocab), samples=4, lr=0.1, local_steps=local_steps, seed=0)
    clients = [text_batch(4, i) for i in range(num_clients)]
    return FedOne(cfg, KeywordBox(), clients, text_batch(6), vocab, "ce")
