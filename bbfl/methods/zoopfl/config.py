"""Configuration of ZooPFL."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from bbfl.exceptions import ConfigError


@dataclass
class ZooPFLConfig:
    """ZooPFL's settings (Lu et al., arXiv 2310.05143; no public code - our choices are documented).

    Args:
        latent_dim: r, the shared encoder's latent size (the zeroth-order estimates live in r + k dims).
        client_embed_dim: k, size of each client's private embedding appended to the latent.
        hidden_dim: width of the encoder's hidden layer.
        prompt_length: L, soft-prefix tokens the surgery writes in front of each example.
        alpha: scale of the fixed random decoder (BBT's projection scaling).
        estimator: ``random`` (q Gaussian directions) or ``coordinate`` (one probe per latent coordinate).
        zo_queries: q, directions per estimate for ``random``.
        zo_mu: smoothing radius of the finite differences, in latent units (latents lie in [-1, 1]).
        local_steps: zeroth-order steps per client per round (each uses all the client's training data).
        lr: Adam learning rate of the encoder and the client embedding.
        remap_lr: learning rate of the semantic re-mapping layer.
        remap_steps: gradient steps of the re-mapping layer per local step.
        pretrain_steps: reconstruction steps of the auto-encoder in each client's first round.
        surgery: train the input surgery (off = re-mapping only, for the ablation).
        remap: train the re-mapping layer (off = surgery only).
        federate: average the shared surgery weights on the server (off = local-only training).
        seed: seeds the decoder, the initial weights and (with the engine seed) the clients.
    """

    latent_dim: int = field(default=8, metadata={"help": "r: shared latent size"})
    client_embed_dim: int = field(default=4, metadata={"help": "k: private client-embedding size"})
    hidden_dim: int = field(default=64, metadata={"help": "encoder hidden width"})
    prompt_length: int = field(default=5, metadata={"help": "L: soft-prefix tokens"})
    alpha: float = field(default=1.0, metadata={"help": "decoder scale"})
    estimator: Literal["random", "coordinate"] = field(default="random", metadata={"help": "ZO estimator"})
    zo_queries: int = field(default=8, metadata={"help": "q: random directions per estimate"})
    zo_mu: float = field(default=0.05, metadata={"help": "finite-difference radius"})
    local_steps: int = field(default=5, metadata={"help": "ZO steps per client-round"})
    lr: float = field(default=0.01, metadata={"help": "Adam lr of encoder + client embedding"})
    remap_lr: float = field(default=0.05, metadata={"help": "Adam lr of the re-mapping layer"})
    remap_steps: int = field(default=5, metadata={"help": "re-mapping steps per local step"})
    pretrain_steps: int = field(default=50, metadata={"help": "auto-encoder reconstruction steps"})
    surgery: bool = field(default=True, metadata={"help": "train the input surgery"})
    remap: bool = field(default=True, metadata={"help": "train the semantic re-mapping"})
    federate: bool = field(default=True, metadata={"help": "average the surgery on the server"})
    seed: int = field(default=42, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        for name in ("latent_dim", "hidden_dim", "prompt_length", "zo_queries", "local_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` should be >= 1, got {getattr(self, name)}.")
        for name in ("client_embed_dim", "remap_steps", "pretrain_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`{name}` should be >= 0, got {getattr(self, name)}.")
        if self.estimator not in ("random", "coordinate"):
            raise ConfigError(f"`estimator` should be random or coordinate, got {self.estimator!r}.")
        if self.zo_mu <= 0 or self.lr <= 0 or self.remap_lr <= 0:
            raise ConfigError(f"`zo_mu`, `lr`, `remap_lr` must be > 0, got {self.zo_mu}, {self.lr}, {self.remap_lr}.")
        if not (self.surgery or self.remap):
            raise ConfigError("at least one of `surgery` and `remap` must be on.")

    @property
    def code_dim(self) -> int:
        """Dimension the zeroth-order estimates live in: shared latent + client embedding."""
        return self.latent_dim + self.client_embed_dim

    def to_dict(self) -> dict:
        return asdict(self)
