"""Configuration of BDPL / FedOne."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from bbfl.exceptions import ConfigError


@dataclass
class BDPLConfig:
    """BDPL's settings (Diao et al., TMLR 2023); FedOne (Wang et al., ICML 2025) reuses them per client.

    Args:
        prompt_length: discrete prompt tokens, each drawn from its own categorical distribution.
        num_candidates: N, size of the candidate vocabulary (PMI n-grams of the training texts unless given).
        samples: I, prompts sampled per step; the loss baseline is their mean (variance reduction).
        lr: step size on the probabilities (then projected back to the simplex). BDPL's run.sh: 1e-4 with AdamW.
        optimizer: ``adamw`` (BDPL's official update) or ``sgd`` (a plain step p -= lr * g: bbfl's earlier
            rule, which with lr 0.25 collapses a row in one step; kept as a named variant).
        weight_decay: AdamW's decoupled weight decay (BDPL: 0.1); ignored by ``sgd``.
        grad_clip: the gradient's L2 norm over all positions is clipped to this before the step (BDPL: 3);
            0 = off.
        budget: training queries (one sampled prompt on one batch), never exceeded.
        local_steps: FedOne: policy-gradient steps a client runs per round.
        eval_every: centralised BDPL: dev check of the most likely prompt every N training queries.
        loss: ``auto`` = the task's loss.
        seed: seeds the sampling.
    """

    prompt_length: int = field(default=10, metadata={"help": "discrete prompt tokens"})
    num_candidates: int = field(default=100, metadata={"help": "N: candidate tokens per position"})
    samples: int = field(default=20, metadata={"help": "I: prompts sampled per step"})
    lr: float = field(default=1e-4, metadata={"help": "step size on the probabilities (AdamW; BDPL: 1e-4)"})
    optimizer: Literal["adamw", "sgd"] = field(default="adamw", metadata={"help": "adamw (BDPL) or sgd"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (BDPL: 0.1)"})
    grad_clip: float = field(default=3.0, metadata={"help": "clip the gradient's L2 norm (BDPL: 3); 0 = off"})
    budget: int = field(default=8000, metadata={"help": "training queries"})
    local_steps: int = field(default=1, metadata={"help": "FedOne: client steps per round"})
    eval_every: int = field(default=100, metadata={"help": "dev check every N training queries"})
    loss: Literal["auto", "ce", "hinge"] = field(default="auto", metadata={"help": "training loss"})
    margin: float = field(default=2.0, metadata={"help": "hinge margin"})
    seed: int = field(default=42, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        for name in ("prompt_length", "num_candidates", "budget", "local_steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` should be >= 1, got {getattr(self, name)}.")
        if self.samples < 2:
            raise ConfigError(f"`samples` should be >= 2 (the baseline needs two), got {self.samples}.")
        if not self.lr > 0:
            raise ConfigError(f"`lr` should be > 0, got {self.lr}.")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"`optimizer` should be adamw or sgd, got {self.optimizer!r}.")
        if not (self.weight_decay >= 0 and self.grad_clip >= 0):  # also rejects NaN
            raise ConfigError(
                f"`weight_decay` and `grad_clip` should be >= 0, got {self.weight_decay}, {self.grad_clip}."
            )
        if self.loss not in ("auto", "ce", "hinge"):
            raise ConfigError(f"`loss` should be auto, ce or hinge, got {self.loss!r}.")

    def to_dict(self) -> dict:
        return asdict(self)
