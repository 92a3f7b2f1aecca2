"""The OpenAI-compatible side of ``bbfl serve``: ``/v1/embeddings``, ``/v1/completions`` (with ``echo``)
and ``/v1/chat/completions``, as the :class:`OpenAICompatible` mixin of :class:`~bbfl.serve.server.Server`.

Its methods check an OpenAI-style JSON payload, queue the texts on the server's batchers and shape the
answer in OpenAI's format; the ``_embed_texts`` / ``_next_token_logprobs`` / ``_echo_logprobs`` methods are
the batched forwards those batchers run. They use the server's ``bb``, ``lock``, ``limits``, ``name`` and
batchers (set by ``Server.__init__``). Kept apart from the soft-prompt scoring that bbfl's own endpoints
serve, so each file stays readable; the routes that call these methods are in :mod:`bbfl.serve.app`.
"""

import base64
import time
import uuid
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bbfl.blackbox import chunking
from bbfl.serve import validate
from bbfl.serve.validate import APIError


class OpenAICompatible:
    """Server methods answering the OpenAI-compatible endpoints (mixed into :class:`~bbfl.serve.server.Server`)."""

    def embeddings(self, payload: dict) -> dict:
        texts = validate.texts(payload.get("input"), "input")
        validate.count("input", len(texts), self.limits.max_examples)
        fmt = payload.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            got = validate.shown(fmt)
            raise APIError(422, f"encoding_format must be float or base64, got {got}", "encoding_format")
        rows = self.embedding_batcher.submit(texts)
        vectors = [vector for vector, _ in rows]
        n_tokens = sum(count for _, count in rows)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist(),
            }
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
        return {"object": "list", "data": data, "model": self._model_id(payload), "usage": usage}

    def _embed_texts(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        """(mean-pooled, L2-normalised last hidden state, token count) per text, in one padded forward."""
        bb = self.bb
        with self.lock, torch.inference_mode():
            enc = bb.tokenizer(texts, padding=True, truncation=True, max_length=bb.max_length, return_tensors="pt")
            enc = {k: v.to(bb.device) for k, v in enc.items()}
            hidden = bb.body(**enc).last_hidden_state.float()
            weights = enc["attention_mask"].float()[..., None]
            vectors = F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp(min=1), dim=-1).cpu().numpy()
            counts = enc["attention_mask"].sum(1).tolist()
        return list(zip(vectors, counts))

    def completions(self, payload: dict) -> dict:
        """One "generated" token per prompt (the next-token distribution), or with ``echo=true`` and
        ``max_tokens=0`` (causal LMs only) the log-probability of every token of each prompt."""
        prompts = validate.texts(payload.get("prompt"), "prompt")
        validate.count("prompt", len(prompts), self.limits.max_examples)
        k = validate.integer(payload.get("logprobs"), "logprobs", 0, self.limits.max_top_logprobs, default=0)
        if validate.flag(payload.get("echo"), "echo"):
            return self._echo_completions(payload, prompts, k)
        logp, n_tokens = self._next_token(prompts)
        choices = []
        for i, (text, row) in enumerate(zip(prompts, logp)):
            top = torch.topk(row, max(k, 1))
            token = self._decode(int(top.indices[0]))
            logprobs = None
            if payload.get("logprobs") is not None:
                table = {self._decode(int(j)): float(v) for v, j in zip(top.values[:k], top.indices[:k])}
                logprobs = {
                    "tokens": [token],
                    "token_logprobs": [float(top.values[0])],
                    "top_logprobs": [table],
                    "text_offset": [len(text)],
                }
            choices.append({"index": i, "text": token, "logprobs": logprobs, "finish_reason": "length"})
        return self._response("text_completion", payload, choices, n_tokens, len(prompts))

    def _echo_completions(self, payload: dict, prompts: list[str], k: int) -> dict:
        """``echo=true, max_tokens=0``: each prompt back with its tokens' log-probabilities (OpenAI's legacy
        format: the first token has none), what lm-eval-style log-likelihood scoring reads."""
        bb = self.bb
        if bb.head != "causal":
            raise APIError(400, f"echo needs a causal LM: {self.name} is a {bb.head} model, which gives no "
                           "left-to-right log-probabilities of a text's tokens", param="echo")  # fmt: skip
        max_tokens = payload.get("max_tokens")
        if isinstance(max_tokens, bool) or max_tokens != 0:  # False == 0 in Python, but it is no token count
            raise APIError(422, "echo is supported only with max_tokens=0 (score the prompt, generate nothing); "
                           f"got max_tokens={max_tokens!r}", param="max_tokens")  # fmt: skip
        encoded = [_echo_tokens(bb.tokenizer, text, i, bb.max_length) for i, text in enumerate(prompts)]
        n_tokens = sum(len(ids) for ids, _ in encoded)
        rows = (
            self.echo_batcher.submit([(ids, k) for ids, _ in encoded]) if payload.get("logprobs") is not None else None
        )
        choices = []
        for i, (text, (ids, offsets)) in enumerate(zip(prompts, encoded)):
            logprobs = None
            if rows is not None:
                token_logprobs, top = rows[i]
                logprobs = {
                    "tokens": [self._decode(t) for t in ids],
                    "token_logprobs": token_logprobs,
                    "top_logprobs": top,
                    "text_offset": offsets,
                }
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": "length"})
        return self._response("text_completion", payload, choices, n_tokens, 0)

    def _echo_logprobs(self, items: list[tuple[list[int], int]]) -> list[tuple[list, list | None]]:
        """Per (token ids, k): [None, log p(t_1 | t_0), ...] and, when k > 0, the top-k table at each position
        (None first), from one right-padded forward of all sequences (requests with different k share it)."""
        bb = self.bb
        sequences, ks = [seq for seq, _ in items], [k for _, k in items]
        k = max(ks)
        ids, attn = _right_padded(sequences, bb._pad_id())
        with self.lock, torch.inference_mode():
            logits = bb.model(input_ids=ids.to(bb.device), attention_mask=attn.to(bb.device)).logits[:, :-1].float()
            norm = torch.logsumexp(logits, -1, keepdim=True)  # log-softmax without a second [N, T, V] tensor
            picked = (logits.gather(-1, ids[:, 1:, None].to(bb.device)) - norm)[..., 0].cpu()
            top = torch.topk(logits, k, -1) if k > 0 else None
            top_values = (top.values - norm).cpu() if top is not None else None
            top_indices = top.indices.cpu() if top is not None else None
        rows = []
        for i, seq in enumerate(sequences):
            n = len(seq) - 1  # predicted positions: every token but the first
            token_logprobs = [None, *picked[i, :n].tolist()]
            table, k_i = None, ks[i]
            if k_i > 0:
                table = [None] + [
                    {self._decode(int(j)): float(v) for v, j in zip(top_values[i, t, :k_i], top_indices[i, t, :k_i])}
                    for t in range(n)
                ]
            rows.append((token_logprobs, table))
        return rows

    def chat(self, payload: dict) -> dict:
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(422, "messages must be a non-empty list", param="messages")
        validate.integer(payload.get("n"), "n", 1, 1, default=1)
        text = self._chat_prompt(messages)
        k = validate.integer(payload.get("top_logprobs"), "top_logprobs", 0, self.limits.max_top_logprobs, default=0)
        want_logprobs = validate.flag(payload.get("logprobs"), "logprobs")
        logp, n_tokens = self._next_token([text])
        top = torch.topk(logp[0], max(k, 1))
        token = self._decode(int(top.indices[0]))
        logprobs = None
        if want_logprobs:
            entries = [_entry(self._decode(int(j)), float(v)) for v, j in zip(top.values[:k], top.indices[:k])]
            logprobs = {"content": [{**_entry(token, float(top.values[0])), "top_logprobs": entries}]}
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": token},
            "logprobs": logprobs,
            "finish_reason": "length",
        }
        return self._response("chat.completion", payload, [choice], n_tokens, 1)

    def _chat_prompt(self, messages: list) -> str:
        """The text the model continues: a causal LM with a chat template reads the messages through it,
        ending with the assistant's turn (as vLLM and llama.cpp serve chat), so top_logprobs are the
        assistant's first token; other models read the message texts joined by newlines."""
        contents = [validate.message_text(m, i) for i, m in enumerate(messages)]
        tokenizer = self.bb.tokenizer
        if self.bb.head != "causal" or not getattr(tokenizer, "chat_template", None):
            return "\n".join(contents)
        import jinja2  # transformers renders chat templates with it (a torch dependency too)

        roles = [validate.message_role(m, i) for i, m in enumerate(messages)]
        turns = [{"role": role, "content": content} for role, content in zip(roles, contents)]
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except jinja2.TemplateError as exc:  # e.g. a role order the template forbids
            raise APIError(422, f"the model's chat template refused these messages: {exc}", "messages") from exc
        bos = tokenizer.bos_token
        if bos and text.startswith(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
            text = text[len(bos) :]  # the tokenizer adds BOS itself: never twice
        return text

    def _next_token(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """[N, V] log-probabilities of the token at the mask (MLM) or after the text (causal), and the token count."""
        bb = self.bb
        if bb.head == "encoder":
            raise APIError(400, f"{self.name} is a sentence encoder: it has no token distribution; "
                           "use /v1/embeddings or /v1/bbfl/scores")  # fmt: skip
        if bb.head == "mlm":
            mask = bb.tokenizer.mask_token
            texts = [t if mask in t else f"{t} {mask}" for t in texts]
            encoded = bb.tokenizer(texts, truncation=True, max_length=bb.max_length, verbose=False)["input_ids"]
            for i, ids in enumerate(encoded):
                if bb.tokenizer.mask_token_id not in ids:
                    raise APIError(422, f"prompt {i}: the mask token was truncated away (over {bb.max_length} "
                                   "tokens)", "prompt")  # fmt: skip
        else:  # the next token follows the prompt's end: a cut-off prompt would answer a different question
            encoded = bb.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
            for i, ids in enumerate(encoded):
                _refuse_over_limit(i, len(ids), bb.max_length)
        rows = self.next_token_batcher.submit(encoded)
        return torch.stack(rows), sum(len(ids) for ids in encoded)

    def _next_token_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Next-token log-probabilities [V] per token-id sequence: at its first mask (MLM) or after its end.

        The sequences run sorted by length, cut as :func:`~bbfl.blackbox.chunking.chunks` cuts a scoring call
        (at most ``next_token_group_tokens`` padded tokens per forward, ending where padding would pass 5%),
        so that a short prompt merged with a long one is not padded to it; and only the read-out position goes
        through the output layer (all [N, T, V] logits would cost a small LM a fifth more compute and N·T·V
        floats of memory for the one row per text that is read).
        """
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        lengths = [len(sequences[i]) for i in order]
        rows: list[torch.Tensor | None] = [None] * len(sequences)
        with self.lock, torch.inference_mode():
            for _, group in chunking.chunks(1, lengths, self.limits.next_token_group_tokens):
                for i, row in zip(order[group], self._read_next_token([sequences[i] for i in order[group]])):
                    rows[i] = row
        return rows

    def _read_next_token(self, sequences: list[list[int]]) -> torch.Tensor:
        """[N, V] log-probabilities at each sequence's read-out position, from one right-padded forward."""
        bb = self.bb
        ids, attn = _right_padded(sequences, bb._pad_id())
        if bb.head == "mlm":
            where = (ids == bb.tokenizer.mask_token_id).float().argmax(1)  # the first mask of each sequence
        else:  # right padding keeps the real tokens at positions 0..n-1, as when each runs alone
            where = attn.sum(1) - 1
        ids, attn = ids.to(bb.device), attn.to(bb.device)
        hidden = bb.body(input_ids=ids, attention_mask=attn).last_hidden_state
        picked = hidden[torch.arange(len(sequences), device=bb.device), where.to(bb.device)]
        return torch.log_softmax(bb.token_head(picked).float(), -1).cpu()

    def _decode(self, token_id: int) -> str:
        return self.bb.tokenizer.decode([token_id])

    def _response(self, obj: str, payload: dict, choices: list, prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "id": f"bbfl-{uuid.uuid4().hex[:16]}",
            "object": obj,
            "created": int(time.time()),
            "model": self._model_id(payload),
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _model_id(self, payload: dict) -> str:
        return payload.get("model") or self.name  # a string: checked with the body (read_json)


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def _right_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, T] token ids padded on the right with ``pad_id``, and the [N, T] attention mask."""
    ids = torch.full((len(sequences), max(len(s) for s in sequences)), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)], attn[i, : len(seq)] = torch.tensor(seq), 1
    return ids, attn


def _refuse_over_limit(index: int, n_tokens: int, max_length: int) -> None:
    """A prompt over the context is an error, never truncated: the cut-off tokens are the ones that matter."""
    if n_tokens > max_length:
        limit = f"limit {max_length}; shorten it or raise bbfl serve --max-length"
        raise APIError(422, f"prompt {index}: {n_tokens} tokens > {limit}", "prompt")


def _echo_tokens(tokenizer: Any, text: str, index: int, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` as echo scores them, and where each starts in ``text`` (OpenAI's ``text_offset``).

    A leading BOS / CLS the tokenizer adds is kept (offset 0): it is the context that gives the text's first
    word a log-probability. Trailing added tokens (SEP / EOS: empty character spans) are dropped: a text being
    scored does not end there, and a client summing the tokens after some offset must not count them.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise APIError(400, "echo needs a fast tokenizer (for text offsets); this model has a slow one", "echo")
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, spans = list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]]
    while ids and spans[-1][0] == spans[-1][1]:
        ids.pop(), spans.pop()
    if not ids:
        raise APIError(422, f"prompt {index} has no tokens to echo", "prompt")
    _refuse_over_limit(index, len(ids), max_length)  # never truncate: the cut tokens are the ones scored
    return ids, [0] + [start for start, _ in spans[1:]]  # OpenAI: the first token starts the text, its spaces too
