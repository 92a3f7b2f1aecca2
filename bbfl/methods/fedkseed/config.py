"""Configuration of FedKSeed (federated zeroth-order tuning with a finite pool of K seeds)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from bbfl.exceptions import ConfigError
from bbfl.peft import PeftOptions


@dataclass
class FedKSeedConfig(PeftOptions):
    """FedKSeed's settings (Qin et al., ICML 2024).

    Args:
        peft, rank, alpha, adapter_size, prompt_length: the tuned weights (see :mod:`bbfl.peft`).
        num_seeds: K, the shared pool of direction seeds (paper: 4096 -> 16 KiB of fp32 scalars).
        local_steps: tau, MeZO steps per client per round, each on one seed from the pool (paper: 200).
        eps: finite-difference step (paper: 5e-4).
        lr: local and global learning rate of the replayed update w -= lr * s * z_k.
        batch_size: examples per local step.
        pro: FedKSeed-Pro: sample seeds by importance. As the official code: each seed's history of
            scalars (starting from one 0) gives amp_k = mean |clip(s, -pro_clip, pro_clip)|; the amps are
            min-max normalised and P = softmax(amp). Uniform when off.
        pro_clip: FedKSeed-Pro's clip of each scalar before |.| (official FedKSeed ``bias_loss_clip``: 1000;
            the FATE port uses 0.5).
        seed: seeds the initial PEFT weights and the seed pool.
    """

    num_seeds: int = field(default=4096, metadata={"help": "K: size of the seed pool"})
    local_steps: int = field(default=20, metadata={"help": "tau: MeZO steps per client-round"})
    eps: float = field(default=5e-4, metadata={"help": "finite-difference step"})
    lr: float = field(default=5e-3, metadata={"help": "learning rate"})
    batch_size: int = field(default=16, metadata={"help": "examples per local step"})
    pro: bool = field(default=False, metadata={"help": "FedKSeed-Pro seed sampling"})
    pro_clip: float = field(default=1000.0, metadata={"help": "FedKSeed-Pro: clip of |scalar|"})
    seed: int = field(default=42, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        self.peft_config()  # validates the PEFT fields
        for name in ("num_seeds", "local_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` should be >= 1, got {getattr(self, name)}.")
        if not self.pro_clip > 0:
            raise ConfigError(f"`pro_clip` should be > 0, got {self.pro_clip}.")
        if self.eps <= 0 or self.lr <= 0:
            raise ConfigError(f"eps and lr must be > 0, got {self.eps}, {self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)
