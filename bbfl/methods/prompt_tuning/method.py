"""White-box soft-prompt tuning: the upper reference a black-box method chases.

Same frozen model, same soft-prompt positions and read-out as BBT, but the L x H prompt is trained
directly by backprop through the model (Lester et al., 2021, https://arxiv.org/abs/2104.08691).
Dev selection as in BBT. This is a baseline, not a black-box method: it needs the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from bbfl.blackbox import Encoded, LocalBlackBox
from bbfl.exceptions import ConfigError
from bbfl.methods.losses import accuracy, get_loss


@dataclass
class PromptTuningConfig:
    """Args:
    steps: optimiser steps on the full few-shot train batch.
    lr: Adam learning rate (prompt embeddings have std ~0.05, so small steps).
    eval_every: dev selection every this many steps.
    """

    steps: int = field(default=200, metadata={"help": "Adam steps on the few-shot train set"})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate"})
    eval_every: int = field(default=10, metadata={"help": "dev selection every N steps"})

    def __post_init__(self) -> None:
        if self.steps < 1 or self.eval_every < 1 or self.lr <= 0:
            raise ConfigError(
                f"steps, eval_every must be >= 1 and lr > 0, got {self.steps}, {self.eval_every}, {self.lr}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def tune_prompt_whitebox(
    config: PromptTuningConfig,
    blackbox: LocalBlackBox,
    train: Encoded,
    dev: Encoded,
    prompt_init: torch.Tensor,
    loss_name: str = "ce",
    on_step: Callable[[dict], None] | None = None,
) -> tuple[torch.Tensor, float]:
    """Train an [L, H] prompt from ``prompt_init``; return (dev-selected prompt, its dev accuracy)."""
    loss_fn = get_loss(loss_name)
    prompt = prompt_init.clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([prompt], lr=config.lr)
    best_prompt, best_acc = prompt_init.clone(), _dev_accuracy(blackbox, prompt_init, dev)
    for step in range(1, config.steps + 1):
        scores = blackbox.forward(prompt[None], train)
        loss = loss_fn(scores, train.labels)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        record = {"step": step, "train_loss": loss.item()}
        if step % config.eval_every == 0 or step == config.steps:
            acc = _dev_accuracy(blackbox, prompt.detach(), dev)
            if acc > best_acc:
                best_prompt, best_acc = prompt.detach().clone(), acc
            record.update(dev_accuracy=acc, best_dev_accuracy=best_acc)
        if on_step is not None:
            on_step(record)
    return best_prompt, best_acc


def _dev_accuracy(blackbox: LocalBlackBox, prompt: torch.Tensor, dev: Encoded) -> float:
    with torch.inference_mode():
        return float(accuracy(blackbox.forward(prompt[None], dev), dev.labels)[0])
