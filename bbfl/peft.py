"""Parameter-efficient weights on a frozen model, as plain tensors that forward-only methods perturb.

Every kind is a set of *delta* tensors read by forward hooks (or, for the soft prompt, passed as the
prompt), never a change to the model's own parameters. That keeps one code path for everything the
estimators need: perturb in place (MeZO), swap in dual tensors (``torch.func.jvp``) or swap in
``requires_grad`` copies (the backprop baseline), and the frozen weights stay bit-identical.

kinds (``PeftConfig.kind``):
  ``lora``     W x + (alpha / r) B A x on the attention query and value projections (Hu et al., 2021;
               FwdLLM uses r = 8, alpha = 16). A ~ N(0, 1/in) from the seed, B = 0.
  ``bitfit``   a bias delta on every linear layer (BitFit tunes biases; ours are the Linear biases).
  ``adapter``  a bottleneck h + U relu(D h) after each block's output projection (Houlsby), U = 0.
  ``prompt``   an L x H soft prompt initialised from random vocabulary embeddings (Lester et al.).
  ``full``     a delta on every linear weight: all weights, for small models only (3x their memory).

>>> from bbfl.peft import PeftConfig
>>> PeftConfig(kind="lora", rank=8).kind
'lora'
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from bbfl.exceptions import ConfigError

KINDS = ("lora", "bitfit", "adapter", "prompt", "full")
LORA_TARGETS = ("query", "value", "q_proj", "v_proj", "q_lin", "v_lin")  # BERT/RoBERTa, LLaMA/OPT, DistilBERT
ADAPTER_TARGETS = ("output.dense", "mlp.down_proj", "fc2", "ffn.lin2")  # each block's last projection


@dataclass
class PeftConfig:
    """Which weights a forward-only method tunes.

    Args:
        kind: lora, bitfit, adapter, prompt or full (see the module docstring).
        rank: LoRA rank r. alpha: LoRA scale numerator (the update is alpha / r * B A).
        adapter_size: bottleneck width of the adapter. prompt_length: soft-prompt tokens.
    """

    kind: str = field(default="lora", metadata={"help": "lora, bitfit, adapter, prompt or full"})
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha"})
    adapter_size: int = field(default=16, metadata={"help": "adapter bottleneck width"})
    prompt_length: int = field(default=10, metadata={"help": "soft-prompt tokens"})

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown PEFT kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        for name in ("rank", "adapter_size", "prompt_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` should be >= 1, got {getattr(self, name)}.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PeftOptions:
    """The PEFT fields a method's config inherits (flat, so the CLI and config.json stay flat)."""

    peft: str = field(default="lora", metadata={"help": "lora, bitfit, adapter, prompt or full"})
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha"})
    adapter_size: int = field(default=16, metadata={"help": "adapter bottleneck"})
    prompt_length: int = field(default=10, metadata={"help": "soft-prompt tokens"})

    def peft_config(self) -> PeftConfig:
        return PeftConfig(self.peft, self.rank, self.alpha, self.adapter_size, self.prompt_length)


class PeftWeights:
    """The tuned tensors of one PEFT kind on ``blackbox.model`` (hooks installed until :meth:`remove`).

    ``tensors`` is an ordered name -> fp32 tensor dict; hooks read the *current* dict, so writing into
    a tensor in place (a perturbation) or swapping the dict (:meth:`swapped`) changes the forward.
    """

    def __init__(self, blackbox, config: PeftConfig, seed: int) -> None:
        self.blackbox, self.config = blackbox, config
        self.tensors: dict[str, torch.Tensor] = {}
        self._handles: list = []
        generator = torch.Generator().manual_seed(seed)
        device = blackbox.device
        if config.kind == "prompt":
            vocab = blackbox.word_embeddings.weight
            ids = torch.randint(1000, min(5000, vocab.shape[0]), (config.prompt_length,), generator=generator)
            self.tensors["prompt"] = vocab[ids.to(vocab.device)].detach().float().clone()
            return
        linears = [(n, m) for n, m in blackbox.model.named_modules() if isinstance(m, torch.nn.Linear)]
        if config.kind == "lora":
            targets = [(n, m) for n, m in linears if n.rsplit(".", 1)[-1] in LORA_TARGETS]
        elif config.kind == "adapter":
            targets = [(n, m) for n, m in linears if n.endswith(ADAPTER_TARGETS) and ".layer" in n + ".layers"]
        else:
            targets = [(n, m) for n, m in linears if _in_body(n)]
        if not targets:
            raise ConfigError(f"PEFT kind {config.kind!r} found no target layers in {type(blackbox.model).__name__}")
        for name, module in targets:
            self._attach(name, module, generator, device)

    # ------------------------------------------------------------------ construction
    def _attach(self, name: str, module: torch.nn.Linear, generator: torch.Generator, device) -> None:
        cfg, d_in, d_out = self.config, module.in_features, module.out_features
        if cfg.kind == "lora":
            a = torch.randn(cfg.rank, d_in, generator=generator) / math.sqrt(d_in)
            self.tensors[f"{name}.lora_A"] = a.to(device)
            self.tensors[f"{name}.lora_B"] = torch.zeros(d_out, cfg.rank, device=device)
        elif cfg.kind == "adapter":
            down = torch.randn(cfg.adapter_size, d_out, generator=generator) / math.sqrt(d_out)
            self.tensors[f"{name}.adapter_down"] = down.to(device)
            self.tensors[f"{name}.adapter_up"] = torch.zeros(d_out, cfg.adapter_size, device=device)
        elif cfg.kind == "bitfit":
            self.tensors[f"{name}.bias_delta"] = torch.zeros(d_out, device=device)
        else:  # full
            self.tensors[f"{name}.weight_delta"] = torch.zeros(d_out, d_in, device=device)
        self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        kind, scale = self.config.kind, self.config.alpha / self.config.rank

        def add_delta(module, args, out):
            t, x = self.tensors, args[0]
            if kind == "lora":
                delta = (x.to(t[f"{name}.lora_A"].dtype) @ t[f"{name}.lora_A"].T) @ t[f"{name}.lora_B"].T * scale
            elif kind == "adapter":
                h = out.to(t[f"{name}.adapter_down"].dtype)
                delta = torch.relu(h @ t[f"{name}.adapter_down"].T) @ t[f"{name}.adapter_up"].T
            elif kind == "bitfit":
                delta = t[f"{name}.bias_delta"]
            else:
                delta = x.to(t[f"{name}.weight_delta"].dtype) @ t[f"{name}.weight_delta"].T
            return out + delta.to(out.dtype)

        return add_delta

    # ------------------------------------------------------------------ use
    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def shapes(self) -> list[torch.Size]:
        return [t.shape for t in self.tensors.values()]

    def params(self) -> list[torch.Tensor]:
        return list(self.tensors.values())

    def scores(self, data) -> torch.Tensor:
        """[B, C] class scores with the current tensors (no inference mode here: the caller decides)."""
        prompt = self.tensors.get("prompt")
        return self.blackbox.forward(None if prompt is None else prompt[None], data)[0]

    def loss(self, data) -> torch.Tensor:
        """Mean cross-entropy on ``data`` with the current tensors (callers pick inference or grad mode)."""
        return torch.nn.functional.cross_entropy(self.scores(data), data.labels.to(self.blackbox.device))

    def forward_loss(self, data) -> float:
        """One counted, forward-only loss evaluation: a query on ``data`` in inference mode."""
        counter = self.blackbox.counter
        with counter.charge(queries=1, examples=len(data), tokens=data.n_tokens), torch.inference_mode():
            return float(self.loss(data))

    @contextmanager
    def swapped(self, tensors: list[torch.Tensor]) -> Iterator[None]:
        """Run the forward with ``tensors`` (same order) in place of the tuned ones (jvp, backprop)."""
        saved = self.tensors
        self.tensors = dict(zip(saved, tensors))
        try:
            yield
        finally:
            self.tensors = saved

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in self.tensors.items()}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        if sorted(arrays) != sorted(self.tensors):
            missing, extra = sorted(set(self.tensors) - set(arrays)), sorted(set(arrays) - set(self.tensors))
            raise ConfigError(f"PEFT arrays do not match this model: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for k, t in self.tensors.items():
                t.copy_(torch.from_numpy(np.asarray(arrays[k], dtype=np.float32)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _in_body(name: str) -> bool:
    # the task read-out (MLM / LM head, pooler) is not part of the tuned body
    return not any(part in name for part in ("cls.", "lm_head", "pooler", "classifier"))
