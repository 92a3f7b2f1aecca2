"""BBT: CMA-ES over a random subspace projected to a soft prompt (Sun et al., ICML 2022)."""

from bbfl.methods.bbt.config import BBTConfig
from bbfl.methods.bbt.experiment import evaluate_run, run_bbt_experiment  # last: the runner imports the pieces above
from bbfl.methods.bbt.method import BBTResult, SubspaceProjection, checkpoint_history, evaluate_prompt, run_bbt

__all__ = [
    "BBTConfig",
    "BBTResult",
    "SubspaceProjection",
    "checkpoint_history",
    "evaluate_prompt",
    "evaluate_run",
    "run_bbt",
    "run_bbt_experiment",
]
