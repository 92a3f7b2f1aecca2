"""Where a soft prompt enters the frozen model: BBT's official placement and ours.

* ``after_embeddings`` (official BBT, ``cat_or_add='add'``): the L prompt positions right after
  [CLS] hold ordinary vocabulary tokens (ids 1000 .. 1000 + L - 1, as the official data loaders
  write them), the embedding layer embeds them like any token (word + position + type embeddings,
  then LayerNorm), and the candidate A z is *added to that output*. The prompt tensor a method
  passes is then A z alone (p0 = 0): the tokens' embedding output plays the role of p0.
* ``inputs_embeds`` (bbfl's earlier path, kept as a named option): the prompt tensor p0 + A z is
  fed as word embeddings, so position/type embeddings and LayerNorm act on it.

Old run directories have no ``prompt_placement`` in their black-box record: they ran
``inputs_embeds``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Literal

import torch

from bbfl.exceptions import ConfigError

PromptPlacement = Literal["auto", "after_embeddings", "inputs_embeds"]
PLACEMENTS = ("after_embeddings", "inputs_embeds")
OFFICIAL_PROMPT_TOKEN_OFFSET = 1000  # the official data loaders decode ids 1000.. into the prompt slot
LEGACY_PLACEMENT = "inputs_embeds"  # what a run recorded before the option existed used


def resolve_placement(placement: str, head: str, has_bert_embeddings: bool) -> str:
    """``auto`` -> the official placement for MLM heads on BERT/RoBERTa (the paper's setting), else ours."""
    if placement == "auto":
        return "after_embeddings" if head == "mlm" and has_bert_embeddings else "inputs_embeds"
    if placement not in PLACEMENTS:
        raise ConfigError(f"unknown prompt_placement {placement!r}; expected auto, after_embeddings or inputs_embeds")
    if placement == "after_embeddings" and not has_bert_embeddings:
        raise ConfigError("prompt_placement='after_embeddings' needs a BERT/RoBERTa embedding layer")
    return placement


def prompt_token_ids(length: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[L] the vocabulary ids that sit at the prompt positions under ``after_embeddings``."""
    if OFFICIAL_PROMPT_TOKEN_OFFSET + length > vocab_size:
        raise ConfigError(
            f"prompt_length {length} needs vocabulary ids up to {OFFICIAL_PROMPT_TOKEN_OFFSET + length - 1}, "
            f"but the vocabulary has {vocab_size}; use prompt_placement='inputs_embeds'"
        )
    return torch.arange(OFFICIAL_PROMPT_TOKEN_OFFSET, OFFICIAL_PROMPT_TOKEN_OFFSET + length, device=device)


def prompt_origin(blackbox: Any, prompt_init: str, length: int) -> torch.Tensor:
    """[L, H] p0, the prompt at z = 0, for a black box of either placement (local or served).

    ``after_embeddings``: zeros, since the prompt tokens' embedding output already is the start;
    ``inputs_embeds``: the embeddings of ``prompt_init`` (e.g. ``.`` repeated).
    """
    if getattr(blackbox, "prompt_placement", LEGACY_PLACEMENT) == "after_embeddings":
        return torch.zeros(length, blackbox.hidden_size, device=blackbox.device)
    return blackbox.token_embeddings(prompt_init, length)


@contextmanager
def added_to_embedding_output(body: torch.nn.Module, offset: torch.Tensor):
    """While active, ``body.embeddings`` returns its output plus ``offset`` (broadcast to [N, T, H])."""

    def add(_module, _args, output):
        return output + offset.to(output.dtype)

    handle = body.embeddings.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()
