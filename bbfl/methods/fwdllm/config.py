"""Configuration of FwdLLM (forward gradients of PEFT weights, federated)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from bbfl.exceptions import ConfigError
from bbfl.federation.privacy import check_dp
from bbfl.peft import KINDS, PeftOptions

ESTIMATORS = ("central", "jvp", "backprop")
UPLINKS = ("dense", "seed")


@dataclass
class FwdLLMConfig(PeftOptions):
    """FwdLLM's settings (Xu et al., USENIX ATC 2024), plus the backprop baseline in the same harness.

    Args:
        peft, rank, alpha, adapter_size, prompt_length: the tuned weights (see :mod:`bbfl.peft`).
        estimator: ``central`` ((L(w+hz) - L(w-hz)) / 2h, FwdLLM), ``jvp`` (exact directional derivative
            by forward-mode AD, no backward graph) or ``backprop`` (the autograd gradient: the baseline).
        h: finite-difference step of ``central`` (FwdLLM: 0.01).
        perturbations: directions per client batch (FwdLLM: 1; pacing may add more).
        max_perturbations: pacing's cap per client batch.
        variance_threshold: client-local variance pacing, bbfl's rule (FwdLLM's server-side pacing is
            not implemented): keep adding directions on the same batch while the per-element variance
            of the mean estimate on the probe tensor (the *last* tuned tensor, nearest the output:
            LoRA's first A matrices have no gradient while B = 0) is above this; at least 2 directions
            (a variance needs two). ``None`` switches pacing off.
        candidates: discriminative sampling: draw this many candidate directions per kept one and keep
            the one most aligned (cosine) with the previous global gradient (FwdLLM: 10). 1 = off.
        batch_size: examples per client batch (sampled from the client's data each round).
        lr: server SGD learning rate, decayed linearly to 0 over the rounds.
        uplink: ``dense`` (the estimate as arrays, as FwdLLM's code) or ``seed`` (the scalars only;
            the server regenerates each direction from the client's seed - FedKSeed's idea).
        dp_clip: differential privacy: each client clips its gradient estimate to this L2 norm
            (:mod:`bbfl.federation.privacy`). ``None`` = off.
        dp_noise: the server adds Gaussian noise (std dp_noise * dp_clip * largest client share) to the mean.
        seed: seeds the initial PEFT weights.
    """

    estimator: str = field(default="central", metadata={"help": "central, jvp or backprop"})
    h: float = field(default=1e-2, metadata={"help": "finite-difference step"})
    perturbations: int = field(default=1, metadata={"help": "directions per client batch"})
    max_perturbations: int = field(default=8, metadata={"help": "pacing cap"})
    variance_threshold: float | None = field(default=None, metadata={"help": "pacing threshold"})
    candidates: int = field(default=1, metadata={"help": "discriminative candidates per direction"})
    batch_size: int = field(default=16, metadata={"help": "examples per client batch"})
    lr: float = field(default=0.05, metadata={"help": "server SGD learning rate"})
    uplink: str = field(default="dense", metadata={"help": "dense or seed"})
    dp_clip: float | None = field(default=None, metadata={"help": "DP: clip each client's estimate"})
    dp_noise: float = field(default=0.0, metadata={"help": "DP: server noise multiplier"})
    seed: int = field(default=42, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        self.peft_config()  # validates the PEFT fields
        if self.peft not in KINDS:
            raise ConfigError(f"unknown --peft {self.peft!r}; expected one of {', '.join(KINDS)}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"unknown --estimator {self.estimator!r}; expected one of {', '.join(ESTIMATORS)}")
        if self.uplink not in UPLINKS:
            raise ConfigError(f"unknown --uplink {self.uplink!r}; expected dense or seed")
        if self.uplink == "seed" and self.estimator == "backprop":
            raise ConfigError("--uplink seed needs a forward estimator (central or jvp), not backprop")
        for name in ("perturbations", "candidates", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` should be >= 1, got {getattr(self, name)}.")
        if self.max_perturbations < self.perturbations:
            raise ConfigError(
                f"max_perturbations ({self.max_perturbations}) must be >= perturbations ({self.perturbations})"
            )
        check_dp(self.dp_clip, self.dp_noise)
        if self.h <= 0 or self.lr <= 0:
            raise ConfigError(f"h and lr must be > 0, got {self.h}, {self.lr}")
        if self.variance_threshold is not None and not self.variance_threshold > 0:
            raise ConfigError(f"variance_threshold must be > 0 or None, got {self.variance_threshold}")
        if self.variance_threshold is not None and self.max_perturbations < 2:
            raise ConfigError(
                f"variance pacing needs max_perturbations >= 2 (a variance needs two estimates), "
                f"got {self.max_perturbations}"
            )

    def to_dict(self) -> dict:
        return asdict(self)
