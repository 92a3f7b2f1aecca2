"""Query accounting shared by every black box.

BBT's cost unit is the *query*: one candidate prompt evaluated on one batch. We also count the
examples and tokens the model processed and the wall-clock seconds, and enforce a hard budget
*before* any work is done, so a run can never overspend (important for paid APIs later).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from bbfl.exceptions import BudgetExceeded, ConfigError


@dataclass
class QueryStats:
    """Running totals of what a black box has been asked to do."""

    queries: int = 0
    examples: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class QueryCounter:
    """Counts queries against an optional budget (``None`` = unlimited).

    >>> c = QueryCounter(budget=5)
    >>> with c.charge(queries=4, examples=64, tokens=1000):
    ...     pass
    >>> c.stats.queries, c.remaining
    (4, 1)
    """

    def __init__(self, budget: int | None = None) -> None:
        if budget is not None and budget < 0:
            raise ConfigError(f"`budget` must be >= 0 or None, got {budget}.")
        self.budget = budget
        self.stats = QueryStats()

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.stats.queries

    def check(self, queries: int) -> None:
        """Raise :class:`BudgetExceeded` if ``queries`` more would pass the budget."""
        if self.budget is not None and self.stats.queries + queries > self.budget:
            raise BudgetExceeded(
                f"query budget exceeded: {self.stats.queries} used + {queries} asked > budget {self.budget}"
            )

    @contextmanager
    def charge(self, queries: int, examples: int, tokens: int) -> Iterator[None]:
        """Check the budget, run the block, then record the work and its time."""
        self.check(queries)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats.queries += queries
            self.stats.examples += examples
            self.stats.tokens += tokens
            self.stats.seconds += time.perf_counter() - start
