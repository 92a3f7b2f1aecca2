"""The frozen model as a client may see it, and query accounting."""

from bbfl.blackbox.base import QueryCounter, QueryStats
from bbfl.blackbox.local import Encoded, LocalBlackBox, default_model_path

__all__ = ["Encoded", "LocalBlackBox", "QueryCounter", "QueryStats", "default_model_path"]
