"""ZooPFL: input surgery + semantic re-mapping around a black box, personalised per client."""

from bbfl.methods.zoopfl.config import ZooPFLConfig
from bbfl.methods.zoopfl.method import ZooPFL, example_features, zo_code_gradient

__all__ = ["ZooPFL", "ZooPFLConfig", "example_features", "zo_code_gradient"]
