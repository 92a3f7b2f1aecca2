"""CMA-ES with pycma's ask/tell interface, a private RNG and no files or globals touched.

pycma by default writes ``outcmaes/`` into the working directory and reseeds numpy's global RNG;
both are switched off here. Its own save format is pickle, so :meth:`CMAES.state_dict` exposes the
search distribution (mean, sigma, covariance) as plain arrays instead.

>>> import numpy as np
>>> es = CMAES(np.ones(5), sigma0=0.5, popsize=8, seed=0)
>>> for _ in range(60):
...     X = es.ask()
...     es.tell(X, [float(x @ x) for x in X])
>>> bool(es.result.fbest < 1e-3)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bbfl.exceptions import ConfigError


@dataclass
class CMAResult:
    xbest: np.ndarray
    fbest: float
    evaluations: int
    iterations: int
    mean: np.ndarray
    sigma: float


class CMAES:
    """Thin ask/tell wrapper around ``cma.CMAEvolutionStrategy``.

    Parameters
    ----------
    x0 : initial mean, shape [d].
    sigma0 : initial step size.
    popsize : candidates per generation (BBT: 20).
    seed : seeds a private ``np.random.Generator`` used for all sampling.
    bounds : optional (lower, upper) box constraint.
    options : further pycma options (never ``seed``/``randn``/``verbose``, which this class owns).
    """

    def __init__(
        self,
        x0: np.ndarray,
        sigma0: float,
        popsize: int,
        seed: int,
        bounds: tuple[float, float] | None = None,
        options: dict | None = None,
    ) -> None:
        import cma

        if sigma0 <= 0:
            raise ConfigError(f"`sigma0` must be > 0, got {sigma0}")
        if popsize < 2:
            raise ConfigError(f"`popsize` must be >= 2, got {popsize}")
        self._rng = np.random.default_rng(seed)
        cma_options = {
            "popsize": popsize,
            "verbose": -9,  # no outcmaes/ litter, no prints
            "verb_log": 0,
            "verb_disp": 0,
            "seed": np.nan,  # do not reseed numpy's global RNG
            "randn": lambda *shape: self._rng.standard_normal(shape),
        }
        if bounds is not None:
            cma_options["bounds"] = list(bounds)
        cma_options.update(options or {})  # e.g. {"CMA_mu": m}: FedBPT's server recombines all m client means
        self.es = cma.CMAEvolutionStrategy(np.asarray(x0, dtype=float), sigma0, cma_options)

    @property
    def popsize(self) -> int:
        return self.es.popsize

    @property
    def mean(self) -> np.ndarray:
        return np.array(self.es.mean)

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    @sigma.setter
    def sigma(self, value: float) -> None:
        self.es.sigma = float(value)

    @property
    def covariance(self) -> np.ndarray:
        """The covariance matrix C of the search distribution (x ~ mean + sigma * N(0, C)), shape [d, d]."""
        return np.array(self.es.sm.C)

    def set_covariance(self, covariance: np.ndarray) -> None:
        """Start sampling from ``covariance`` (e.g. a server's C received by a FedBPT client)."""
        c = np.asarray(covariance, dtype=float)
        d = len(self.es.mean)
        if c.shape != (d, d) or not np.all(np.isfinite(c)):
            raise ConfigError(f"covariance must be a finite [{d}, {d}] matrix, got shape {c.shape}")
        self.es.sm.C = (c + c.T) / 2  # symmetric even after a float16 round trip
        self.es.sm.update_now(-1)  # eigendecompose now: pycma otherwise refreshes B, D lazily

    @property
    def mu(self) -> int:
        """Number of parents recombined per generation."""
        return int(self.es.sp.weights.mu)

    def ask(self) -> np.ndarray:
        """Sample a generation, shape [popsize, d]."""
        return np.asarray(self.es.ask())

    def tell(self, candidates: np.ndarray | Sequence[np.ndarray], losses: Sequence[float]) -> None:
        """Update the search distribution with the losses of the candidates from :meth:`ask`."""
        self.es.tell(list(np.asarray(candidates)), [float(x) for x in losses])

    def stop(self) -> dict:
        """Termination criteria that fired (empty = keep going)."""
        return dict(self.es.stop())

    @property
    def result(self) -> CMAResult:
        r = self.es.result
        return CMAResult(
            xbest=np.array(r.xbest),
            fbest=float(r.fbest),
            evaluations=int(r.evaluations),
            iterations=int(r.iterations),
            mean=self.mean,
            sigma=self.sigma,
        )
