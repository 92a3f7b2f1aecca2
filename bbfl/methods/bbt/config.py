"""Configuration of Black-Box Tuning (BBT)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from bbfl.exceptions import ConfigError


@dataclass
class BBTConfig:
    """BBT's settings; defaults follow Sun et al. (ICML 2022) where the paper sets them.

    Args:
        intrinsic_dim: d, the dimension CMA-ES searches in (paper: 500).
        prompt_length: L, soft-prompt tokens (paper: 50).
        popsize: CMA-ES population per generation (paper: 20).
        budget: training queries; one query = one candidate on the train batch (paper: 8000).
        sigma0: CMA-ES initial step size (paper: 1).
        alpha: scale of the random projection A (paper: 1).
        loss: ``auto`` takes the task's (hinge for MRPC/SNLI/RTE, else cross-entropy).
        margin: hinge margin (paper: 2).
        eval_every: dev-set selection every this many training queries (paper: 100).
        prompt_init: token or text whose embeddings form p0, the prompt at z = 0, when the black box
            feeds prompts as word embeddings (``prompt_placement='inputs_embeds'``). Under the official
            placement (``after_embeddings``, the default for MLM heads) p0 = 0 and the prompt positions
            hold vocabulary ids 1000.., whose embedding-layer output is the start, as in the paper's code.
        seed: seeds the projection A, CMA-ES and the few-shot sample.
    """

    intrinsic_dim: int = field(default=500, metadata={"help": "d: dimension of the CMA-ES search space"})
    prompt_length: int = field(default=50, metadata={"help": "L: number of soft-prompt tokens"})
    popsize: int = field(default=20, metadata={"help": "CMA-ES candidates per generation"})
    budget: int = field(default=8000, metadata={"help": "training queries (candidate x train batch)"})
    sigma0: float = field(default=1.0, metadata={"help": "CMA-ES initial step size"})
    alpha: float = field(default=1.0, metadata={"help": "scale of the random projection"})
    loss: Literal["auto", "ce", "hinge"] = field(default="auto", metadata={"help": "training loss"})
    margin: float = field(default=2.0, metadata={"help": "hinge-loss margin"})
    eval_every: int = field(default=100, metadata={"help": "dev selection every N training queries"})
    prompt_init: str = field(default=".", metadata={"help": "token/text whose embedding is the prompt at z=0"})
    seed: int = field(default=42, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        for name in ("intrinsic_dim", "prompt_length", "popsize", "budget", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` should be >= 1, got {getattr(self, name)}.")
        if self.popsize < 2:
            raise ConfigError(f"`popsize` should be >= 2, got {self.popsize}.")
        if self.budget < self.popsize:
            raise ConfigError(f"`budget` ({self.budget}) should be at least one generation ({self.popsize}).")
        if self.sigma0 <= 0 or self.alpha <= 0:
            raise ConfigError(f"`sigma0` and `alpha` should be > 0, got {self.sigma0}, {self.alpha}.")
        if self.loss not in ("auto", "ce", "hinge"):
            raise ConfigError(f"`loss` should be auto, ce or hinge, got {self.loss!r}.")

    def to_dict(self) -> dict:
        return asdict(self)
