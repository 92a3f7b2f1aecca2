"""Causal-LM scoring with the soft prompt after the input, sharing the input's key/values.

With ``prompt_position="after_input"`` each sequence is ``[input][prompt][template tail]`` and the
class scores are the label words' next-token logits after the tail (e.g. input ``Review: {text}``,
tail ``\\nSentiment:``, label words `` negative`` / `` positive``). In a causal LM a token's key/values
depend only on the tokens before it, so the input's key/values are the same for every candidate
prompt: :func:`scores_after_input` computes them once per batch, expands them over the population and
runs only the L prompt tokens and the tail per candidate -- B x T + P x B x (L + K) tokens instead of
P x B x (T + L + K). The result is the plain forward's, up to float rounding
(``tests/test_causal_kv.py`` checks it against :func:`scores_after_input` with ``share=False``).

Inputs are right-padded; each example's prompt and tail take the positions right after its own last
token (explicit position ids), and the padding keys are masked, so padding changes nothing.
The paper's placement (prompt first, BBT / FedBPT) stays the default in :class:`LocalBlackBox`.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from torch.nn.utils.rnn import pad_sequence

from bbfl.exceptions import ConfigError

PromptPosition = Literal["start", "after_input"]
PROMPT_POSITIONS = ("start", "after_input")
_PLACEHOLDERS = ("{text}", "{text_pair}")


def template_tail(template: str) -> str:
    """The template text between its last input placeholder and ``{mask}``: the part after the prompt.

    >>> template_tail("Review: {text}\\nSentiment: {mask}")
    '\\nSentiment:'
    >>> template_tail("{text} . It was {mask} .")
    ' . It was'
    """
    before_mask = template.split("{mask}")[0]
    cut = max(before_mask.rfind(p) + len(p) if p in before_mask else -1 for p in _PLACEHOLDERS)
    if cut < 0:
        raise ConfigError(
            f"prompt_position='after_input' needs a template with {{text}} before {{mask}}, got {template!r}"
        )
    return before_mask[cut:].rstrip()


def split_off_tail(texts: list[str], tail: str) -> list[str]:
    """Each causal context without its (shared) template tail: the part before the prompt."""
    if not tail:
        return texts
    heads = []
    for text in texts:
        if not text.endswith(tail):  # pragma: no cover - texts come from the same template
            raise ConfigError(f"example {text[:60]!r} does not end with the template tail {tail!r}")
        heads.append(text[: -len(tail)])
    return heads


def ids_keeping_tail(tokenizer, texts: list[str], template: str, max_length: int) -> list[list[int]]:
    """Token ids of causal contexts; one over ``max_length`` is cut inside its input, never in its tail.

    Plain right truncation would cut the template tail ("...\nThis news article is about") away, and the
    model would read the label word after a cut-off article. Contexts that fit keep their own tokenization.
    """
    ids = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
    long = [i for i, one in enumerate(ids) if len(one) > max_length]
    if not long:
        return ids
    tail = template_tail(template)
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    prefix, suffix = _special_tokens_around(tokenizer)  # e.g. LLaMA's BOS; kept around the whole context
    room = max_length - len(tail_ids) - len(prefix) - len(suffix)
    if room < 1:
        raise ConfigError(f"max_length {max_length} leaves no room for an input before the template tail {tail!r}")
    heads = split_off_tail([texts[i] for i in long], tail)
    cut = tokenizer(heads, add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
    for i, head in zip(long, cut):
        ids[i] = prefix + head + tail_ids + suffix
    return ids


def _special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text's own tokens."""
    wrapped = tokenizer("a")["input_ids"]
    own = tokenizer("a", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(wrapped)) if wrapped[i : i + len(own)] == own)
    return wrapped[:start], wrapped[start + len(own) :]


def scores_after_input(
    model: torch.nn.Module,
    prompts: torch.Tensor,
    inputs: list[torch.Tensor],
    tail: torch.Tensor,
    label_ids: torch.Tensor,
    pad_id: int,
    share: bool = True,
) -> torch.Tensor:
    """[P, B, C] label-word logits of ``[input_b][prompt_p][tail]`` for every candidate and example.

    Parameters
    ----------
    model : a transformers causal LM (``base_model`` + output embeddings), in eval mode.
    prompts : [P, L, H] candidate prompts, or [P, B, L, H] one per example (ZooPFL's paired prompts).
    inputs : B 1-D token-id tensors (the input part, special tokens included), any lengths.
    tail : [K] token ids after the prompt (may be empty); the label word is read after it.
    label_ids : [C] the label words' first tokens.
    share : compute the inputs' key/values once for all candidates (``False``: one plain forward of
        the whole sequence per candidate and example, the reference this must equal).
    """
    n_cand, n_ex = prompts.shape[0], len(inputs)
    if n_ex == 0:
        raise ConfigError("no examples to score")
    device = prompts.device
    embed = model.get_input_embeddings()
    lengths = torch.tensor([len(t) for t in inputs], device=device)
    per_example = prompts if prompts.dim() == 4 else prompts[:, None].expand(-1, n_ex, -1, -1)
    tail_embeds = embed(tail.to(device))[None, None].expand(n_cand, n_ex, -1, -1).to(prompts.dtype)
    suffix = torch.cat([per_example, tail_embeds], 2).flatten(0, 1)  # [P*B, L+K, H], candidate-major
    if share and suffix.shape[1] > 0:  # no prompt and no tail: nothing to share, the plain forward reads the input
        hidden = _suffix_hidden_shared(model, inputs, lengths, suffix, n_cand, pad_id)
    else:
        hidden = _suffix_hidden_full(model, inputs, lengths, suffix, n_cand)
    logits = model.get_output_embeddings()(hidden)[..., label_ids]
    return logits.float().unflatten(0, (n_cand, n_ex))


def _suffix_hidden_shared(model, inputs, lengths, suffix, n_cand: int, pad_id: int) -> torch.Tensor:
    """The last suffix token's hidden state, with the inputs' key/values computed once."""
    body = model.base_model
    input_ids = pad_sequence(inputs, batch_first=True, padding_value=pad_id)  # [B, T], right-padded
    mask = pad_sequence([torch.ones_like(t) for t in inputs], batch_first=True)
    cache = _cache_of(body(input_ids=input_ids, attention_mask=mask, use_cache=True))
    # rows are candidate-major (p * B + b): tile the cache over candidates, don't interleave it
    cache.reorder_cache(torch.arange(len(inputs), device=suffix.device).repeat(n_cand))
    n_suffix = suffix.shape[1]
    full_mask = torch.cat([mask.repeat(n_cand, 1), mask.new_ones(len(suffix), n_suffix)], 1)
    positions = lengths.repeat(n_cand)[:, None] + torch.arange(n_suffix, device=suffix.device)
    out = body(inputs_embeds=suffix, attention_mask=full_mask, position_ids=positions, **{_cache_arg(body): cache})
    return out.last_hidden_state[:, -1]


def _cache_arg(body: torch.nn.Module) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` (the old name still works, with a warning)
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _suffix_hidden_full(model, inputs, lengths, suffix, n_cand: int) -> torch.Tensor:
    """The reference: every candidate's whole sequence ``[input][suffix]`` through the model, right-padded."""
    n_ex, n_suffix = len(inputs), suffix.shape[1]
    words = pad_sequence([model.get_input_embeddings()(t) for t in inputs], batch_first=True).to(suffix.dtype)
    width = words.shape[1] + n_suffix
    embeds = torch.cat([words, words.new_zeros(n_ex, n_suffix, words.shape[2])], 1).repeat(n_cand, 1, 1)
    starts = lengths.repeat(n_cand)  # row r = candidate r // B, example r % B; its suffix follows its input
    at = (starts[:, None] + torch.arange(n_suffix, device=suffix.device))[..., None].expand_as(suffix)
    embeds = embeds.scatter(1, at, suffix)
    mask = (torch.arange(width, device=suffix.device) < (starts + n_suffix)[:, None]).long()
    hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    return hidden[torch.arange(len(embeds), device=suffix.device), starts + n_suffix - 1]
