"""BDPL (discrete prompts by policy gradient through a text API) and FedOne, its federated form."""

from bbfl.methods.bdpl.config import BDPLConfig
from bbfl.methods.bdpl.method import (
    BDPLResult,
    FedOne,
    PromptPolicy,
    candidate_vocab,
    fedone_plan,
    fedone_round_queries,
    pmi_ngrams,
    policy_gradient,
    project_simplex,
    run_bdpl,
)

__all__ = [
    "BDPLConfig",
    "BDPLResult",
    "FedOne",
    "PromptPolicy",
    "candidate_vocab",
    "fedone_plan",
    "fedone_round_queries",
    "pmi_ngrams",
    "policy_gradient",
    "project_simplex",
    "run_bdpl",
]
