"""FwdLLM: forward gradients (central difference or jvp) of PEFT weights, federated; backprop baseline."""

from bbfl.methods.fwdllm.config import FwdLLMConfig
from bbfl.methods.fwdllm.method import FwdLLM, probe_variance, sample_batch

__all__ = ["FwdLLM", "FwdLLMConfig", "probe_variance", "sample_batch"]
