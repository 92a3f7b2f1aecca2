"""FedBPT: federated BBT - local CMA-ES on clients, search distributions aggregated on the server."""

from bbfl.methods.fedbpt.config import FedBPTConfig
from bbfl.methods.fedbpt.experiment import (  # last: the runner imports the pieces above
    run_fedbpt_experiment,
    run_fedbpt_personal_experiment,
)
from bbfl.methods.fedbpt.method import FedBPT

__all__ = ["FedBPT", "FedBPTConfig", "run_fedbpt_experiment", "run_fedbpt_personal_experiment"]
