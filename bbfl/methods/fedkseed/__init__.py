"""FedKSeed: zeroth-order federated tuning with K shared seeds; (seed, scalar) up and down."""

from bbfl.methods.fedkseed.config import FedKSeedConfig
from bbfl.methods.fedkseed.method import FedKSeed, replay, seed_probabilities

__all__ = ["FedKSeed", "FedKSeedConfig", "replay", "seed_probabilities"]
