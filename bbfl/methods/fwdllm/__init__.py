"""FwdLLM: forward gradients (central difference or jvp) of PEFT weights, federated; backprop baseline."""

from bbfl.methods.fwdllm.config import FwdLLMConfig
from bbfl.methods.fwdllm.experiment import run_forward_experiment  # last: the runner imports the pieces above
from bbfl.methods.fwdllm.method import FwdLLM, probe_variance, sample_batch

__all__ = ["FwdLLM", "FwdLLMConfig", "probe_variance", "run_forward_experiment", "sample_batch"]
