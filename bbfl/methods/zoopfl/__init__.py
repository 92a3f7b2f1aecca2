"""ZooPFL: input surgery + semantic re-mapping around a black box, personalised per client."""

from bbfl.methods.zoopfl.config import ZooPFLConfig
from bbfl.methods.zoopfl.experiment import run_zoopfl_experiment  # last: the runner imports the pieces above
from bbfl.methods.zoopfl.method import ZooPFL, example_features, fit_remap, personal_summary, zo_code_gradient
from bbfl.methods.zoopfl.shared_prompt import fit_client_remaps, personal_accuracy_of_prompt, prompt_scores

__all__ = [
    "ZooPFL",
    "ZooPFLConfig",
    "example_features",
    "fit_client_remaps",
    "fit_remap",
    "personal_accuracy_of_prompt",
    "personal_summary",
    "prompt_scores",
    "run_zoopfl_experiment",
    "zo_code_gradient",
]
