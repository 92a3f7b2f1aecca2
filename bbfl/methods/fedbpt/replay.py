"""A FedBPT client's local CMA-ES, and its replay on the server from the client's seed and rankings.

A client's local search is a deterministic function of its start (the downlink mean, sigma and
optionally covariance, exactly as the wire delivered them), its seed and, per generation, the
*ranking* of its candidates: pycma's mean, step-size and covariance updates read the fitness values
only through their argsort (with its default options, which :class:`bbfl.optim.CMAES` keeps). So
``--uplink replay`` sends the seed and 8 x 5 ranks instead of a d-vector, and the server re-runs the
search to the same final mean and step sizes, bit for bit.

A side effect: the server's copy of the search only ever recombines candidates it drew itself from
the client's seed, so a client can move the mean only within its own sampled candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bbfl.exceptions import BBFLError
from bbfl.optim import CMAES

RANK_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"  # one character per candidate: popsize <= 36
MAX_REPLAY_POPSIZE = len(RANK_DIGITS)


class ReplayError(BBFLError, ValueError):
    """A replay uplink's header cannot be replayed (the server drops that update and says why)."""


@dataclass
class LocalSearch:
    """Where a client's local CMA-ES ended and what the server needs to rebuild it."""

    mean: np.ndarray  # final mean, float64
    sigmas: list[float]  # the step size at the start of each generation
    mu: int  # parents per generation
    ranks: str  # per generation, each candidate's rank (0 = best), RANK_DIGITS-encoded


def local_search(
    start: np.ndarray,
    sigma: float,
    covariance: np.ndarray | None,
    popsize: int,
    generations: int,
    seed: int,
    fitness: Callable[[int, np.ndarray], np.ndarray],
) -> LocalSearch:
    """Run ``generations`` of CMA-ES from (start, sigma[, covariance]); ``fitness(g, X)`` scores generation g."""
    es = CMAES(np.asarray(start, dtype=np.float64), float(sigma), popsize, seed=seed)
    if covariance is not None:
        es.set_covariance(covariance)
    sigmas, ranks = [], []
    for generation in range(generations):
        sigmas.append(es.sigma)
        candidates = es.ask()
        values = np.asarray(fitness(generation, candidates), dtype=np.float64)
        es.tell(candidates, values)
        ranks.append(_ranks(values))
    return LocalSearch(es.mean, sigmas, es.mu, "".join(ranks))


def _ranks(values: np.ndarray) -> str:
    # pycma orders a generation by np.argsort(values); the ranks of that order reproduce it exactly
    order = np.argsort(values)
    ranks = np.empty(len(values), dtype=int)
    ranks[order] = np.arange(len(values))
    return "".join(RANK_DIGITS[r] for r in ranks)


def replay_search(
    start: np.ndarray,
    sigma: float,
    covariance: np.ndarray | None,
    popsize: int,
    generations: int,
    seed: int,
    ranks: str,
) -> LocalSearch:
    """The server's copy of a client's :func:`local_search`, driven by the uploaded ranks."""
    table = parse_ranks(ranks, popsize, generations)
    return local_search(start, sigma, covariance, popsize, generations, seed, lambda g, _x: table[g])


def parse_ranks(ranks: object, popsize: int, generations: int) -> np.ndarray:
    """[generations, popsize] float ranks from the uploaded string; anything else is a ReplayError."""
    if not isinstance(ranks, str) or len(ranks) != popsize * generations:
        shown = ranks[:60] if isinstance(ranks, str) else type(ranks).__name__
        raise ReplayError(f"'ranks' should be {popsize * generations} rank digits, got {shown!r}")
    try:
        table = np.array([RANK_DIGITS.index(c) for c in ranks], dtype=np.float64).reshape(generations, popsize)
    except ValueError as exc:
        raise ReplayError(f"'ranks' has a character outside {RANK_DIGITS[:popsize]!r}: {ranks[:60]!r}") from exc
    if not np.array_equal(np.sort(table, axis=1), np.tile(np.arange(popsize), (generations, 1))):
        raise ReplayError(f"each generation's ranks should be a permutation of 0..{popsize - 1}: {ranks!r}")
    return table


def parse_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ReplayError(f"'seed' should be an integer in [0, 2**32), got {seed!r}")
    return seed
