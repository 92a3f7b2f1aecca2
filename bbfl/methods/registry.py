"""Federated methods by name: what rebuilds a run's method from its ``config.json`` (Flower's apps, ``predict``).

Each method's ``experiment.py`` has a ``<method>_from_config(config) -> (method, engine config)``; this
table names them, as ``peft`` maps a ``PeftType`` to its tuner. The imports are lazy so that reading
the names does not load every method.

>>> FEDERATED_METHODS
('fedbpt', 'zoopfl', 'fwdllm', 'fedkseed', 'fedone')
"""

from __future__ import annotations

from collections.abc import Callable

from bbfl.exceptions import ConfigError
from bbfl.federation.contract import FederatedMethod
from bbfl.federation.engine import EngineConfig

# the config "method"s build_federated_method (so Flower's apps) accepts; for front ends' checks
FEDERATED_METHODS = ("fedbpt", "zoopfl", "fwdllm", "fedkseed", "fedone")


def _builder(name: str) -> Callable[[dict], tuple[FederatedMethod, EngineConfig]]:
    if name == "fedbpt":
        from bbfl.methods.fedbpt.experiment import fedbpt_from_config

        return fedbpt_from_config
    if name == "zoopfl":
        from bbfl.methods.zoopfl.experiment import zoopfl_from_config

        return zoopfl_from_config
    if name in ("fwdllm", "fedkseed"):
        from bbfl.methods.fwdllm.experiment import forward_from_config

        return forward_from_config
    from bbfl.methods.bdpl.experiment import fedone_from_config  # a text API, not a LocalBlackBox

    return fedone_from_config


def build_federated_method(config: dict) -> tuple[FederatedMethod, EngineConfig]:
    """(method, engine config) from a run's ``config.json`` contents - what Flower's apps build on both sides."""
    name = config.get("method")
    if name not in FEDERATED_METHODS:
        raise ConfigError(f"unknown federated method {name!r}; expected one of {FEDERATED_METHODS}")
    return _builder(name)(config)
