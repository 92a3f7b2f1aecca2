"""A faster soft-prompt forward for BERT-family encoders: the prompt as an input-independent prefix.

In the plain ("full") path every candidate prompt is concatenated to every example and the whole
sequence runs through the model: P candidates x B examples x (L + T) tokens. Here the L prompt
tokens attend only to each other (like a causal LM's prefix, or prefix-tuning's key/values), so
their hidden states do not depend on the example. That lets us

* run the prompt stream once per candidate (P x L tokens instead of P x B x L),
* run the examples' first-layer projections once for all candidates (they do not depend on the prompt
  yet), and
* skip the prompt stream in the last layer (only its keys/values are read there).

The examples still attend to the prompt at every layer, so the prompt steers them as before. Positions
are the same as in the full path (prompt right after [CLS]), so only the prompt-to-example
attention differs. ``tests/test_blackbox.py`` checks this function against the Hugging Face forward
with the equivalent 4-D attention mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREFIX_MODEL_TYPES = ("bert", "roberta")


def supports_prefix(body: torch.nn.Module) -> bool:
    """Whether ``body`` (a transformers base model) has the BERT layer layout this module needs."""
    return getattr(body.config, "model_type", None) in PREFIX_MODEL_TYPES and hasattr(body, "encoder")


def _position_offset(body: torch.nn.Module) -> int:
    # RoBERTa numbers positions from padding_idx + 1; BERT from 0.
    if body.config.model_type == "roberta":
        return body.embeddings.padding_idx + 1
    return 0


def _embed(body: torch.nn.Module, word_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    emb = body.embeddings
    token_type = emb.token_type_embeddings.weight[0]
    return emb.LayerNorm(word_embeds + token_type + emb.position_embeddings(positions))


def _split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    # [..., T, H] -> [..., n_heads, T, H / n_heads]
    return x.unflatten(-1, (n_heads, -1)).transpose(-2, -3)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -3).flatten(-2)


def prefix_encode(
    body: torch.nn.Module,
    prompt: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    insert_at: int = 1,
    prompt_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Last hidden states of the examples' tokens for every candidate prompt.

    Parameters
    ----------
    body : a BERT/RoBERTa base model in eval mode.
    prompt : [P, L, H] prompt embeddings (word-embedding space), one row per candidate.
    input_ids, attention_mask : [B, T] the examples, right-padded.
    insert_at : the prompt sits between token ``insert_at - 1`` and ``insert_at`` (after [CLS]).
    prompt_ids : [L] tokens at the prompt positions for the official BBT placement: ``prompt`` is then
        added to their embedding-layer output; ``None``: ``prompt`` is fed as word embeddings.

    Returns
    -------
    [P, B, T, H] hidden states of the example tokens (prompt positions are not returned).
    """
    n_cand, n_prompt, _ = prompt.shape
    n_ex, n_tok = input_ids.shape
    device = input_ids.device
    offset = _position_offset(body)
    layers = body.encoder.layer
    n_heads = layers[0].attention.self.num_attention_heads

    tok_pos = torch.arange(n_tok, device=device)
    tok_pos = torch.where(tok_pos >= insert_at, tok_pos + n_prompt, tok_pos) + offset
    prompt_pos = torch.arange(insert_at, insert_at + n_prompt, device=device) + offset

    if prompt_ids is None:
        h_prompt = _embed(body, prompt, prompt_pos)  # [P, L, H]
    else:  # after_embeddings: LayerNorm(tokens' embeddings) + A z
        h_prompt = _embed(body, body.embeddings.word_embeddings(prompt_ids), prompt_pos)[None] + prompt
    h_tok = _embed(body, body.embeddings.word_embeddings(input_ids), tok_pos)  # [B, T, H], shared by all P
    # Keys an example may read: every prompt token, then its own non-pad tokens.
    key_mask = torch.cat([attention_mask.new_ones(n_ex, n_prompt), attention_mask], dim=1).bool()
    key_mask = key_mask[None, :, None, None, :].expand(n_cand, -1, -1, -1, -1).reshape(n_cand * n_ex, 1, 1, -1)

    for depth, layer in enumerate(layers):
        att = layer.attention.self
        k_prompt = _split_heads(att.key(h_prompt), n_heads)  # [P, nh, L, dh]
        v_prompt = _split_heads(att.value(h_prompt), n_heads)
        q_tok, k_tok, v_tok = (_split_heads(proj(h_tok), n_heads) for proj in (att.query, att.key, att.value))
        if h_tok.dim() == 3:  # first layer: the projections were computed once for all candidates
            q_tok, k_tok, v_tok = (t.expand(n_cand, *t.shape) for t in (q_tok, k_tok, v_tok))
            h_tok = h_tok.expand(n_cand, -1, -1, -1)
        keys = torch.cat([k_prompt[:, None].expand(-1, n_ex, -1, -1, -1), k_tok], dim=-2)
        values = torch.cat([v_prompt[:, None].expand(-1, n_ex, -1, -1, -1), v_tok], dim=-2)
        attended = F.scaled_dot_product_attention(
            q_tok.reshape(n_cand * n_ex, n_heads, n_tok, -1),
            keys.reshape(n_cand * n_ex, n_heads, n_prompt + n_tok, -1),
            values.reshape(n_cand * n_ex, n_heads, n_prompt + n_tok, -1),
            attn_mask=key_mask,
        )
        attended = _merge_heads(attended).reshape(n_cand, n_ex, n_tok, -1)
        h_tok = _feed_forward(layer, layer.attention.output(attended, h_tok))
        if depth < len(layers) - 1 and n_prompt > 0:  # the last layer's prompt outputs are never read
            q_prompt = _split_heads(att.query(h_prompt), n_heads)
            attended = _merge_heads(F.scaled_dot_product_attention(q_prompt, k_prompt, v_prompt))
            h_prompt = _feed_forward(layer, layer.attention.output(attended, h_prompt))
    return h_tok


def _feed_forward(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return layer.output(layer.intermediate(hidden), hidden)


def prefix_attention_mask(attention_mask: torch.Tensor, n_prompt: int, insert_at: int = 1) -> torch.Tensor:
    """The boolean [B, 1, T', T'] mask that makes a full forward equal :func:`prefix_encode` (for tests)."""
    n_ex, n_tok = attention_mask.shape
    total = n_tok + n_prompt
    keys = torch.cat(
        [attention_mask[:, :insert_at], attention_mask.new_ones(n_ex, n_prompt), attention_mask[:, insert_at:]], 1
    ).bool()
    mask = keys[:, None, None, :].expand(n_ex, 1, total, total).clone()
    is_prompt = torch.zeros(total, dtype=torch.bool, device=attention_mask.device)
    is_prompt[insert_at : insert_at + n_prompt] = True
    # prompt rows may read only prompt columns
    mask[:, :, is_prompt, :] = is_prompt[None, None, None, :].expand(n_ex, 1, n_prompt, total)
    return mask
