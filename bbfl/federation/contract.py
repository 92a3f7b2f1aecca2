"""What every federated method gives an engine (the in-process one or Flower).

A method owns its server state, client update and aggregation; an engine owns rounds, sampling,
serialisation and checkpoints. Messages are arrays plus a JSON-able header, nothing else.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]


class FederatedMethod(ABC):
    """What a method gives the engine. Arrays + JSON headers only; the engine does the serialising."""

    num_clients: int
    server_secret: int | None = None  # set by the engine: server-only randomness (DP noise), checkpointed

    @abstractmethod
    def downlink(self, round_: int) -> tuple[Arrays, dict]:
        """The message every sampled client receives this round."""

    @abstractmethod
    def client_update(self, client: int, round_: int, arrays: Arrays, header: dict, seed: int) -> tuple[Arrays, dict]:
        """Run one client's local work from the decoded downlink; return its update."""

    @abstractmethod
    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes an update's arrays must have (checked before aggregation)."""

    @abstractmethod
    def aggregate(self, round_: int, updates: list[tuple[int, Arrays, dict]]) -> dict:
        """Fold the valid updates into the server state; return metrics."""

    @abstractmethod
    def evaluate(self, round_: int) -> dict:
        """Metrics of the current global state (e.g. global test accuracy)."""

    @abstractmethod
    def state(self) -> tuple[Arrays, dict]:
        """Everything needed to rebuild the server state (arrays + JSON-able header)."""

    @abstractmethod
    def load_state(self, arrays: Arrays, header: dict) -> None:
        """Inverse of :meth:`state`."""

    def check_update(self, client: int, arrays: Arrays, header: dict) -> None:
        """Method-specific checks of one update, after its shapes and header fields passed.

        Raise :class:`bbfl.federation.wire.InvalidUpdate` to reject it (logged, the round goes on).
        Most methods need nothing beyond ``update_shapes`` and ``header_spec``.
        """
        return None

    # Per-client state (personalised parts that never leave a client). Methods without any keep these
    # defaults; the engine persists what ``client_state`` returns next to its checkpoint.
    def client_state(self, client: int) -> Arrays | None:
        """The private state of ``client`` (arrays only), or ``None``."""
        return None

    def load_client_state(self, client: int, arrays: Arrays) -> None:
        """Inverse of :meth:`client_state` (called on resume)."""
        return None  # stateless clients: nothing to restore


class ClientClock:
    """Wall-clock of a method's client updates in this process, and the black box's seconds inside them.

    Wraps ``method.client_update`` on the instance (the class is untouched); counts since it was made
    (a resumed run starts again from zero).
    """

    def __init__(self, method: FederatedMethod, blackbox: Any) -> None:
        self.seconds = self.blackbox_seconds = 0.0
        self.updates = 0
        update = method.client_update

        def timed(*args, **kwargs):
            began, inside = time.perf_counter(), blackbox.counter.stats.seconds
            try:
                return update(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - began
                self.blackbox_seconds += blackbox.counter.stats.seconds - inside
                self.updates += 1

        method.client_update = timed
