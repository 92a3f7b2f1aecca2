"""Derivative-free and forward-gradient optimisers with an ask/tell interface."""

from bbfl.optim.cmaes import CMAES, CMAResult

__all__ = ["CMAES", "CMAResult"]
