"""ZooPFL's baselines built on one shared prompt: scored on every client's own test split, as it is or
through each client's private semantic re-mapping (ZooPFL's layer, fitted on the client's own data).

The shared prompt is FedBPT's final global prompt (``FedBPT + local re-mapping only``), the BBT start
p0, or ``None`` (no prompt: zero-shot). Personalised accuracy is defined as ZooPFL's
(:func:`~bbfl.methods.zoopfl.method.personal_summary`), so the numbers sit in one table.
"""

from __future__ import annotations

import numpy as np
import torch

from bbfl.blackbox import Encoded, LocalBlackBox
from bbfl.methods.zoopfl.config import ZooPFLConfig
from bbfl.methods.zoopfl.method import _accuracy, fit_remap, personal_summary

Remap = tuple[np.ndarray, np.ndarray]  # (weight [C, C], bias [C]) of one client


def prompt_scores(blackbox: LocalBlackBox, prompt: torch.Tensor | None, data: Encoded) -> torch.Tensor:
    """[B, C] class scores of ``data`` under one prompt ([L, H] or [1, L, H]; ``None`` = no prompt)."""
    if prompt is not None and prompt.dim() == 2:
        prompt = prompt[None]
    return blackbox.logits(prompt, data)[0].float().cpu()


def personal_accuracy_of_prompt(
    blackbox: LocalBlackBox,
    prompt: torch.Tensor | None,
    client_tests: list[Encoded],
    remaps: list[Remap] | None = None,
) -> dict:
    """ZooPFL's personalised metrics of one shared prompt over the clients' own test splits.

    ``remaps``: each client's private (weight, bias), applied to its scores before the argmax.
    Returns ``personal_accuracy`` (test-size weighted), ``personal_accuracy_client_mean``,
    ``personal_accuracy_min`` and ``client_accuracies`` (``None`` for a client with no test data).
    """
    per_client, accuracies = [], []
    for c, data in enumerate(client_tests):
        if len(data) == 0:
            accuracies.append(None)
            continue
        scores = prompt_scores(blackbox, prompt, data)
        if remaps is not None:
            weight, bias = remaps[c]
            scores = scores @ torch.from_numpy(weight).T + torch.from_numpy(bias)
        acc = _accuracy(scores, data.labels)
        per_client.append((acc, len(data)))
        accuracies.append(acc)
    return {**personal_summary(per_client), "client_accuracies": accuracies}


def fit_client_remaps(
    blackbox: LocalBlackBox,
    prompt: torch.Tensor | None,
    client_trains: list[Encoded],
    config: ZooPFLConfig,
    rounds: int = 1,
) -> list[Remap]:
    """Each client's private re-mapping (:func:`fit_remap`) on its own train split's scores under ``prompt``.

    One black-box query per client (the prompt is fixed, so its scores never change); the fit is local
    and nothing of it leaves the client.
    """
    return [fit_remap(prompt_scores(blackbox, prompt, data), data.labels, config, rounds) for data in client_trains]
