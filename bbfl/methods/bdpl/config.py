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
        num_candidates: N, size of the candidate vocabulary (most frequent training words unless given).
        samples: I, prompts sampled per step; the loss baseline is their mean (variance reduction).
        lr: step size of the policy gradient on the probabilities (then projected back to the simplex).
        budget: training queries (one sampled prompt on one batch), never exceeded.
        local_steps: FedOne: policy-gradient steps a client runs per round.
        eval_every: centralised BDPL: dev check of the most likely prompt every N training queries.
        loss: ``auto`` = the task's loss.
        seed: seeds the sampling.
    """

    prompt_length: int = field(default=10, metadata={"help": "discrete prompt tokens"})
    num_candidates: int = field(default=100, metadata={"help": "N: candidate tokens per position"})
    samples: int = field(default=20, metadata={"help": "I: prompts sampled per step"})
    lr: float = field(default=0.5, metadata={"help": "policy-gradient step on the probabilities"})
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
        if self.lr <= 0:
            raise ConfigError(f"`lr` should be > 0, got {self.lr}.")
        if self.loss not in ("auto", "ce", "hinge"):
            raise ConfigError(f"`loss` should be auto, ce or hinge, got {self.loss!r}.")

    def to_dict(self) -> dict:
        return asdict(self)
