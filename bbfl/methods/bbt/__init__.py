"""BBT: CMA-ES over a random subspace projected to a soft prompt (Sun et al., ICML 2022)."""

from bbfl.methods.bbt.config import BBTConfig
from bbfl.methods.bbt.method import BBTResult, SubspaceProjection, checkpoint_history, evaluate_prompt, run_bbt

__all__ = ["BBTConfig", "BBTResult", "SubspaceProjection", "checkpoint_history", "evaluate_prompt", "run_bbt"]
