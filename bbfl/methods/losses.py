"""Losses and metrics on population scores ``[P, B, C]`` -> one value per candidate ``[P]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bbfl.exceptions import ConfigError


def cross_entropy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch, per candidate."""
    n_cand = scores.shape[0]
    per_example = F.cross_entropy(scores.flatten(0, 1), labels.repeat(n_cand), reduction="none")
    return per_example.view(n_cand, -1).mean(1)


def hinge(scores: torch.Tensor, labels: torch.Tensor, margin: float = 2.0) -> torch.Tensor:
    """Multi-class hinge loss (BBT uses margin 2 for MRPC/SNLI/RTE): mean over wrong classes of
    ``max(0, margin - (s_y - s_j))``, averaged over the batch, per candidate."""
    true = scores.gather(-1, labels[None, :, None].expand(scores.shape[0], -1, 1))
    violations = (margin - true + scores).clamp(min=0)
    wrong = torch.ones_like(scores, dtype=torch.bool).scatter(-1, labels[None, :, None].expand_as(true), False)
    return (violations * wrong).sum(-1).div(scores.shape[-1] - 1).mean(-1)


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of correct argmax predictions, per candidate."""
    return (scores.argmax(-1) == labels[None]).float().mean(-1)


def get_loss(name: str, margin: float = 2.0):
    """The loss function called ``name`` (``ce`` or ``hinge``)."""
    if name == "ce":
        return cross_entropy
    if name == "hinge":
        return lambda scores, labels: hinge(scores, labels, margin)
    raise ConfigError(f"unknown loss {name!r}; expected 'ce' or 'hinge'")
