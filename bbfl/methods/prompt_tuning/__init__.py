"""White-box soft-prompt tuning baseline (backprop through the frozen model)."""

from bbfl.methods.prompt_tuning.method import PromptTuningConfig, tune_prompt_whitebox

__all__ = ["PromptTuningConfig", "tune_prompt_whitebox"]
