"""Configuration of FedBPT."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from bbfl.exceptions import ConfigError
from bbfl.federation.privacy import check_dp
from bbfl.methods.fedbpt.replay import MAX_REPLAY_POPSIZE


@dataclass
class FedBPTConfig:
    """FedBPT's settings; defaults follow Sun et al. (ICML 2024) and the official NVFlare example.

    Args:
        intrinsic_dim: d (500).
        prompt_length: L (50).
        local_popsize: each client's CMA-ES population (5).
        local_iter: local CMA-ES generations per round (8).
        sigma0: initial step size (1).
        alpha: projection scale (1).
        loss: ``auto`` = the task's loss.
        perturb_rate: the fitness is loss(clean) / loss(a copy with tokens replaced at this rate), the copy
            drawn afresh every round (0.5: the paper's and official code's fitness ratio). 0 = the plain loss,
            our variant: half the examples scored, but under label-skewed splits the smallest clients then
            lead the server's update (README: Dirichlet 0.5 falls 12 points below the ratio).
        aggregation: ``fedbpt`` (server CMA-ES tells the client means, pooled sigma), ``fedavg``
            (average of client means and sigmas), or a robust rule on the client means: ``median``
            (FedMedian), ``trimmed`` (FedTrimmedAvg, ``trim`` per side) or ``krum`` (``num_malicious``).
        trim: share trimmed on each side for ``trimmed``.
        num_malicious: Krum's assumed number of poisoned clients.
        downlink_covariance: also send the server CMA-ES covariance C ([d, d]) so that clients sample
            from it, as the official code's copied CMA object does; d^2 floats more per client-round.
        min_sigma: floor of the global step size after each round. Default 0 = none, as the official
            code behaves: ``global_es.py`` sets sigma to 0.5 when it falls below, but the next line
            puts it back to the unfloored value whenever that is smaller, so the floor never acts.
            > 0 is our variant, a floor that holds.
        uplink: ``dense`` (the paper: the client's final mean, a d-vector) or ``replay`` (the client's
            seed and the ranks of its 8 x 5 candidates; the server re-runs its CMA-ES to the same mean,
            bit for bit: :mod:`bbfl.methods.fedbpt.replay`).
        dp_clip: differential privacy: clients clip the change of their mean to this L2 norm
            (:mod:`bbfl.federation.privacy`; needs aggregation='fedavg'). ``None`` = off.
        dp_noise: the server adds Gaussian noise of std dp_noise * dp_clip / (number of clients) to
            the averaged mean (example-weighted: the largest client's share instead of 1 / m).
        prompt_init: token/text whose embedding is the prompt at z = 0.
        seed: seeds A, the server's CMA-ES and (with the engine seed) the clients.
    """

    intrinsic_dim: int = field(default=500, metadata={"help": "d: CMA-ES search dimension"})
    prompt_length: int = field(default=50, metadata={"help": "L: soft-prompt tokens"})
    local_popsize: int = field(default=5, metadata={"help": "client CMA-ES population"})
    local_iter: int = field(default=8, metadata={"help": "client CMA-ES generations per round"})
    sigma0: float = field(default=1.0, metadata={"help": "initial CMA-ES step size"})
    alpha: float = field(default=1.0, metadata={"help": "projection scale"})
    loss: Literal["auto", "ce", "hinge"] = field(default="auto", metadata={"help": "training loss"})
    margin: float = field(default=2.0, metadata={"help": "hinge margin"})
    perturb_rate: float = field(default=0.5, metadata={"help": "token replacement rate for the fitness ratio"})
    aggregation: Literal["fedbpt", "fedavg", "median", "trimmed", "krum"] = field(
        default="fedbpt", metadata={"help": "server rule"}
    )
    trim: float = field(default=0.2, metadata={"help": "trimmed share per side"})
    num_malicious: int = field(default=0, metadata={"help": "Krum's assumed poisoned clients"})
    downlink_covariance: bool = field(default=False, metadata={"help": "send C to clients (d^2 floats)"})
    min_sigma: float = field(default=0.0, metadata={"help": "floor of the global step size (0 = official: none)"})
    uplink: Literal["dense", "replay"] = field(default="dense", metadata={"help": "dense mean or seed+ranks replay"})
    dp_clip: float | None = field(default=None, metadata={"help": "DP: clip each client's change to this norm"})
    dp_noise: float = field(default=0.0, metadata={"help": "DP: server noise multiplier"})
    prompt_init: str = field(default=".", metadata={"help": "prompt at z = 0"})
    seed: int = field(default=42, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        for name in ("intrinsic_dim", "prompt_length", "local_iter"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` should be >= 1, got {getattr(self, name)}.")
        if self.local_popsize < 2:
            raise ConfigError(f"`local_popsize` should be >= 2, got {self.local_popsize}.")
        if not 0.0 <= self.perturb_rate < 1.0:
            raise ConfigError(f"`perturb_rate` should be in [0, 1), got {self.perturb_rate}.")
        if self.aggregation not in ("fedbpt", "fedavg", "median", "trimmed", "krum"):
            raise ConfigError(
                f"`aggregation` should be fedbpt, fedavg, median, trimmed or krum, got {self.aggregation!r}."
            )
        if self.downlink_covariance and self.aggregation != "fedbpt":
            raise ConfigError("`downlink_covariance` needs aggregation='fedbpt' (fedavg keeps no covariance).")
        check_dp(self.dp_clip, self.dp_noise)
        if self.dp_clip is not None and self.aggregation != "fedavg":
            raise ConfigError(
                f"differential privacy (dp_clip) needs aggregation='fedavg', got {self.aggregation!r}: "
                "the server CMA-ES and the robust rules do not average, so the noise would not be calibrated"
            )
        if self.uplink not in ("dense", "replay"):
            raise ConfigError(f"`uplink` should be dense or replay, got {self.uplink!r}.")
        if self.uplink == "replay" and self.local_popsize > MAX_REPLAY_POPSIZE:
            raise ConfigError(
                f"`uplink='replay'` supports local_popsize <= {MAX_REPLAY_POPSIZE}, got {self.local_popsize}."
            )
        if self.sigma0 <= 0 or self.min_sigma < 0:
            raise ConfigError(f"`sigma0` > 0 and `min_sigma` >= 0 needed, got {self.sigma0}, {self.min_sigma}.")

    def to_dict(self) -> dict:
        return asdict(self)
