"""FedBPT: federated BBT - local CMA-ES on clients, search distributions aggregated on the server."""

from bbfl.methods.fedbpt.config import FedBPTConfig
from bbfl.methods.fedbpt.method import FedBPT

__all__ = ["FedBPT", "FedBPTConfig"]
