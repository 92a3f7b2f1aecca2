"""``bbfl serve``: a frozen local model as Language-Model-as-a-Service over HTTP (FastAPI + uvicorn).

Endpoints (all but ``/health`` need ``Authorization: Bearer <token>``):

* ``POST /v1/bbfl/scores`` - soft prompts in, class scores out, both as safetensors bytes (format in
  :mod:`bbfl.blackbox.remote`). What BBT / FedBPT need; :class:`~bbfl.blackbox.remote.RemoteBlackBox`
  is its client.
* ``GET /v1/bbfl/info``, ``POST /v1/bbfl/token_embeddings`` - model facts BBT's projection needs
  (hidden size, embedding std, the embeddings of the prompt-init token).
* ``POST /v1/bbfl/features`` - ZooPFL's client features (:func:`bbfl.methods.zoopfl.example_features`:
  each text's mean input word embedding / the embedding std) as a safetensors ``features`` [B, H]; the
  request is a scores request without ``prompts``. No model forward: it charges no queries.
* OpenAI-compatible ``POST /v1/embeddings``: the mean-pooled, L2-normalised last hidden state (for
  the MiniLM default: its sentence embedding).
* OpenAI-compatible ``POST /v1/completions`` (``logprobs``; for a causal LM also ``echo`` with
  ``max_tokens=0``: the prompt's own token log-probabilities) and ``POST /v1/chat/completions``
  (``logprobs`` + ``top_logprobs``). These "generate" exactly one token and report the model's
  **next-token distribution over the whole vocabulary**: for a masked LM, the distribution at the
  ``[MASK]`` position (the text's first mask; `` [MASK]`` is appended when there is none); for a
  causal LM, after the last token. Reading the label words there is the MLM verbalizer of BBT.
  A sentence-encoder model has no token distribution and answers 400.
* ``GET /health`` (no auth): status, model, the totals served, and the queued requests dropped unrun
  because their client had disconnected (``abandoned``; per batcher for text requests).

Every request is checked before it reaches the model (:mod:`bbfl.serve.validate`): malformed input is a
400 / 422 JSON error naming the field, what it got and what was expected, never a 500; size, count and
class limits give 413 / 422; a body that stops arriving is cut off after ``body_timeout_s`` (408). An
unexpected error is a JSON 500 that keeps the keep-alive connection usable (:class:`CatchAll`). Replies
name the model (a hub id, or a local directory's last component), never where its files are. Text
requests (embeddings, completions, echo, chat) are **batched across concurrent requests**: handlers wait in a
thread pool (never on the event loop) while one worker per kind runs everything that queued up while
the model was busy as one padded forward (:class:`Batcher`). ``/v1/bbfl/scores`` requests already carry
a whole population; they run one at a time. ``/health`` reports model calls vs. requests.
"""

# no `from __future__ import annotations`: FastAPI must resolve the handlers' `Request` annotations
import base64
import hashlib
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bbfl.blackbox import LocalBlackBox
from bbfl.blackbox.remote import TASK_FIELDS, pack, unpack
from bbfl.data import Split, Task
from bbfl.exceptions import BBFLError
from bbfl.processes import free_port, start_server_process
from bbfl.serve import validate
from bbfl.serve.validate import APIError, Perturb

SAFETENSORS = "application/octet-stream"
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # what the embedded default model is
LOG = logging.getLogger("bbfl.serve")
# set by a text request's handler, read by Batcher.submit in the handler's worker thread (the context travels
# with run_in_threadpool): an event that is set once the request's client has disconnected
CLIENT_GONE: ContextVar[threading.Event | None] = ContextVar("bbfl_client_gone", default=None)


@dataclass
class ServeLimits:
    """What one request may ask for; more gets a 413 (bytes) or 422 (counts) naming the limit."""

    max_request_bytes: int = 32 * 2**20
    max_prompts: int = 256  # candidates P per /v1/bbfl/scores request (the client splits bigger populations)
    max_examples: int = 1024  # examples B per scores request, inputs per embeddings / completions request
    max_top_logprobs: int = 20  # OpenAI's own cap
    max_prompt_length: int = 256  # L: soft-prompt tokens (they add to the model's position budget)
    max_batch_texts: int = 64  # texts per batched forward, summed over the concurrent requests merged into it
    batch_wait_ms: float = 2.0  # after a text request arrives, wait this long for others to share its forward
    max_classes: int = 64  # classes per task: each is a label word / description the model reads for every request
    body_timeout_s: float = 30.0  # a body that stops arriving before its Content-Length is cut off (408)


@dataclass
class ScoresRequest:
    """A checked /v1/bbfl/scores (or, without prompts, /v1/bbfl/features) request, ready for the model."""

    task: Task
    split: Split
    perturb: Perturb | None
    prompts: torch.Tensor | None = None  # float32 [P, L, H] or [K, B, L, H]


@dataclass
class _Job:
    items: list
    done: threading.Event = field(default_factory=threading.Event)
    result: list | None = None
    error: BaseException | None = None
    gone: threading.Event | None = None  # set when the client has disconnected: drop the job, unrun


class Batcher:
    """Dynamic batching: concurrent callers' items go through ``run`` together, in one model call.

    ``submit(items)`` blocks its (thread-pool) caller until its results are back. A worker thread takes
    the oldest job plus every job that queued up meanwhile, up to ``max_items`` items, and calls
    ``run(all_items) -> one result per item``. A busy server merges what arrived while it was busy; with
    ``max_wait_s > 0`` the worker also waits that long after the first job for more to arrive (TorchServe's
    ``maxBatchDelay``: a little latency for fuller batches). If a merged call fails, each job is retried
    alone so that one request's bad input fails only that request. A job whose client has gone by the time
    the worker reaches it (:data:`CLIENT_GONE`) is dropped without running.
    """

    def __init__(
        self, run: Callable[[list], Sequence], max_items: int, max_wait_s: float = 0.0, name: str = "batcher"
    ) -> None:
        self.run, self.max_items, self.max_wait_s = run, max(1, max_items), max_wait_s
        self.calls = 0  # model calls made
        self.jobs = 0  # requests served
        self.abandoned = 0  # requests dropped unrun: their client had gone
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._carry: _Job | None = None  # a job that did not fit the last batch goes first next time
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def submit(self, items: list) -> list:
        job = _Job(list(items), gone=CLIENT_GONE.get())
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _loop(self) -> None:
        while True:
            self._execute(self._next_batch())

    def _next_batch(self) -> list[_Job]:
        first, self._carry = self._carry or self._queue.get(), None
        while self._drop_if_gone(first):
            first = self._queue.get()
        jobs, count = [first], len(first.items)
        deadline = time.monotonic() + self.max_wait_s
        while count < self.max_items:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if self._drop_if_gone(job):
                continue
            if count + len(job.items) > self.max_items:
                self._carry = job
                break
            jobs.append(job)
            count += len(job.items)
        return jobs

    def _drop_if_gone(self, job: _Job) -> bool:
        if job.gone is None or not job.gone.is_set():
            return False
        job.error = APIError(499, "the client closed the connection before its turn; not run", "client_closed")
        self.abandoned += 1
        job.done.set()
        return True

    def _execute(self, jobs: list[_Job]) -> None:
        try:
            results = self._call([item for job in jobs for item in job.items])
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller(s), never swallowed
            if len(jobs) == 1:
                jobs[0].error = exc
                jobs[0].done.set()
            else:  # find whose input broke the merged call: each job alone
                for job in jobs:
                    self._execute([job])
            return
        start = 0
        for job in jobs:
            job.result, start = list(results[start : start + len(job.items)]), start + len(job.items)
            self.jobs += 1
            job.done.set()

    def _call(self, items: list) -> list:
        results: list = []
        for start in range(0, len(items), self.max_items):  # one big request is split too: memory stays capped
            chunk = items[start : start + self.max_items]
            self.calls += 1
            out = self.run(chunk)
            if len(out) != len(chunk):
                raise RuntimeError(f"batched call returned {len(out)} results for {len(chunk)} items")
            results.extend(out)
        return results


class Server:
    """The model plus the state a served model needs: a lock, batchers, an encoding cache and counters."""

    def __init__(self, blackbox: LocalBlackBox, token: str | None, limits: ServeLimits) -> None:
        self.bb, self.token, self.limits = blackbox, token, limits
        self.name = public_model_name(blackbox.model_name)  # never the absolute path of the model's files
        self.abandoned = 0  # queued scores / features requests dropped because their client had gone
        self.lock = threading.Lock()  # one forward at a time: the model and its task state are shared
        self.encodings: OrderedDict[str, Any] = OrderedDict()  # request texts -> Encoded (LRU)
        self.requests = 0
        wait = limits.batch_wait_ms / 1000
        self.embedding_batcher = Batcher(self._embed_texts, limits.max_batch_texts, wait, "bbfl-embeddings")
        self.next_token_batcher = Batcher(self._next_token_logprobs, limits.max_batch_texts, wait, "bbfl-next-token")
        self.echo_batcher = Batcher(self._echo_logprobs, limits.max_batch_texts, wait, "bbfl-echo")
        self.started = time.time()

    # ------------------------------------------------------------------ soft-prompt scoring
    def parse_scores(self, body: bytes) -> ScoresRequest:
        """Check a scores request completely before it queues for the model (nothing reaches it unchecked)."""
        tensors, meta = self._unpack(body)
        prompts = validate.prompts_tensor(tensors, self.bb.hidden_size)
        task, split = validate.task_and_split(meta, self.limits.max_classes)
        n_ex = len(split)
        validate.count("prompts", prompts.shape[0], self.limits.max_prompts)
        validate.count("texts", n_ex, self.limits.max_examples)
        validate.count("prompt length", prompts.shape[-2], self.limits.max_prompt_length, allow_zero=True)
        if prompts.dim() == 4 and prompts.shape[1] != n_ex:
            raise APIError(422, f"paired prompts need one per example: {prompts.shape[1]} for {n_ex} texts", "prompts")
        return ScoresRequest(task, split, validate.perturb(meta.get("perturb")), prompts.float())

    def scores(self, request: ScoresRequest) -> tuple[bytes, int]:
        prompts = request.prompts
        with self.lock:
            data = self._encoded(request)
            self.bb._prepare_task(request.task)  # a cached encoding may belong to another task than the last one
            before = self.bb.counter.stats.tokens
            if prompts.dim() == 4:
                out = self.bb.paired_logits(prompts, data)
            else:
                out = self.bb.logits(None if prompts.shape[1] == 0 else prompts, data)
            tokens = self.bb.counter.stats.tokens - before
        return pack({"scores": out.float().cpu()}), tokens

    def parse_features(self, body: bytes) -> ScoresRequest:
        _, meta = self._unpack(body)
        task, split = validate.task_and_split(meta, self.limits.max_classes)
        validate.count("texts", len(split), self.limits.max_examples)
        return ScoresRequest(task, split, validate.perturb(meta.get("perturb")))

    def features(self, request: ScoresRequest) -> bytes:
        """ZooPFL's features of the request's texts: what a local run computes from the embedding table."""
        from bbfl.methods.zoopfl.method import example_features  # lazy: the server needs ZooPFL only here

        with self.lock:
            # encoded outside inference mode, as /v1/bbfl/scores does: the cached encoding is shared with it
            data = self._encoded(request)
            with torch.inference_mode():
                out = example_features(self.bb, data)
        return pack({"features": out.float().cpu()})

    @staticmethod
    def _unpack(body: bytes) -> tuple[dict[str, torch.Tensor], dict]:
        try:
            tensors, meta = unpack(body)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        return tensors, validate.request_meta(meta)

    def _encoded(self, request: ScoresRequest):
        task, split, perturb = request.task, request.split, request.perturb
        spec = {f: getattr(task, f) for f in TASK_FIELDS}
        perturbation = None if perturb is None else asdict(perturb)
        key = hashlib.sha256(json.dumps([spec, split.texts, split.text_pairs, perturbation]).encode()).hexdigest()
        if key in self.encodings:
            self.encodings.move_to_end(key)
            return self.encodings[key]
        try:
            data = self.bb.encode(task, split)
            if perturb is not None:
                data = self.bb.perturbed(data, perturb.rate, perturb.seed)
        except BBFLError as exc:
            raise APIError(422, str(exc)) from exc
        self.encodings[key] = data
        if len(self.encodings) > 64:
            self.encodings.popitem(last=False)
        return data

    def token_embeddings(self, payload: dict) -> bytes:
        text = validate.text(payload.get("text"), "text")
        length = validate.integer(payload.get("length"), "length", 1, 4096)
        with self.lock:
            try:
                emb = self.bb.token_embeddings(text, length)
            except BBFLError as exc:
                raise APIError(422, str(exc), param="text") from exc
        return pack({"embeddings": emb.cpu()})

    def info(self) -> dict:
        return {
            "model": self.name,
            "head": self.bb.head,
            "prompt_attention": self.bb.prompt_attention,
            "prompt_placement": self.bb.prompt_placement,
            "hidden_size": self.bb.hidden_size,
            "embedding_std": self.bb.embedding_std,
            "vocab_size": self.bb.word_embeddings.num_embeddings,
            "mask_token": self.bb.tokenizer.mask_token,
            "limits": asdict(self.limits),
        }

    # ------------------------------------------------------------------ OpenAI-compatible
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
        ids = torch.zeros(len(sequences), max(len(s) for s in sequences), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, seq in enumerate(sequences):
            ids[i, : len(seq)], attn[i, : len(seq)] = torch.tensor(seq), 1
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
        rows = self.next_token_batcher.submit(texts)
        return torch.stack([row for row, _ in rows]), sum(count for _, count in rows)

    def _next_token_logprobs(self, texts: list[str]) -> list[tuple[torch.Tensor, int]]:
        """(next-token log-probabilities [V], token count) per text, in one padded forward."""
        bb = self.bb
        with self.lock, torch.inference_mode():
            enc = bb.tokenizer(texts, padding=True, truncation=True, max_length=bb.max_length, return_tensors="pt")
            ids, attn = enc["input_ids"].to(bb.device), enc["attention_mask"].to(bb.device)
            if bb.head == "mlm":
                hit = ids == bb.tokenizer.mask_token_id
                if not bool(hit.any(1).all()):
                    raise APIError(422, f"the mask token was truncated away (over {bb.max_length} tokens)", "prompt")
                where = hit.float().argmax(1)  # the first mask of each text
            else:
                if bb.tokenizer.padding_side == "left":
                    where = torch.full((len(texts),), ids.shape[1] - 1, device=bb.device)
                else:
                    where = attn.sum(1) - 1
            logits = bb.model(input_ids=ids, attention_mask=attn).logits
            picked = logits[torch.arange(len(texts), device=bb.device), where.long()]
            logp = torch.log_softmax(picked.float(), -1).cpu()
            return list(zip(logp, attn.sum(1).tolist()))

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
    if len(ids) > max_length:  # never truncate: the tokens cut off would be the ones a caller scores
        raise APIError(422, f"prompt {index}: {len(ids)} tokens > limit {max_length}; shorten it", "prompt")
    return ids, [0] + [start for start, _ in spans[1:]]  # OpenAI: the first token starts the text, its spaces too


# ---------------------------------------------------------------------- the FastAPI app
def public_model_name(model: str) -> str:
    """The name /health, /v1/models and error messages show: a hub id as given, a local directory by its
    last component (its absolute path tells a client about the server's file system, nothing about the model)."""
    from pathlib import Path

    from bbfl.blackbox import default_model_path

    if model == default_model_path():
        return DEFAULT_MODEL_NAME
    path = Path(model)
    return path.name if (path.is_absolute() or path.exists()) and path.name else model


class CatchAll:
    """ASGI wrapper answering an unexpected exception with a JSON 500 *without re-raising it*.

    Starlette's ``exception_handler(Exception)`` re-raises after answering, and uvicorn then closes the
    connection, resetting the client's next keep-alive request; a handled 500 leaves the connection usable.
    Every known bad input is a 4xx before it gets here; this is the backstop that logs the traceback.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if scope["type"] != "http" or started:
                raise  # too late for a clean answer: uvicorn closes the connection
            LOG.exception("unexpected error serving %s %s", scope.get("method"), scope.get("path"))
            await _json_response(500, f"internal error ({type(exc).__name__})", "server_error", None, send)


async def _json_response(
    status: int, message: str, kind: str, param: str | None, send: Callable, close: bool = False
) -> None:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    raw = json.dumps(body, ensure_ascii=True).encode()  # ASCII: a lone surrogate in a message cannot break it
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if close:  # the rest of the body may never come: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


def create_app(blackbox: LocalBlackBox, token: str | None, limits: ServeLimits | None = None):
    """The ASGI app serving ``blackbox``. ``token=None`` turns authentication off (the CLI asks for it)."""
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool

    server = Server(blackbox, token, limits or ServeLimits())
    app = FastAPI(title="bbfl serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(CatchAll)
    model_queue = asyncio.Lock()  # scores / features run one at a time, in arrival order (asyncio locks are FIFO)

    class _Answer(Response):
        """A JSON error sent as-is (ASCII, optional ``Connection: close``)."""

        def __init__(self, exc: APIError) -> None:
            super().__init__()
            self.exc = exc

        async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
            exc = self.exc
            message = exc.message.replace(server.bb.model_name, server.name)  # e.g. a BBFLError naming the model
            await _json_response(exc.status, message, exc.kind, exc.param, send, close=exc.status == 408)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return _Answer(exc)

    async def read(request: Request) -> bytes:
        """Authenticate, then read the body without ever holding more than the size limit, or waiting for it
        longer than the body timeout."""
        if server.token is not None:
            given = request.headers.get("authorization", "")
            if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), server.token.encode())):
                raise APIError(401, "missing or wrong bearer token (Authorization: Bearer <token>)", "authentication")
        server.requests += 1
        limit = server.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {int(declared)} bytes > limit {limit} bytes", "request_too_large")

        async def collect() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body over the limit of {limit} bytes", "request_too_large")
                chunks.append(chunk)
            return b"".join(chunks)

        timeout = server.limits.body_timeout_s
        try:
            return await asyncio.wait_for(collect(), timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"request body not received within {timeout} s (--body-timeout)", "timeout") from None

    async def read_json(request: Request) -> dict:
        payload = validate.parse_json(await read(request))
        if payload.get("model") is not None:  # echoed back in the response
            validate.text(payload["model"], "model")
        return payload

    async def in_turn(request: Request, work: Callable, job: ScoresRequest) -> Any:
        """Run ``work(job)`` when the model queue reaches it, unless its client has gone by then: a backlog
        of abandoned requests (timed-out clients) must not keep the model busy."""
        async with model_queue:
            if await request.is_disconnected():
                server.abandoned += 1
                raise APIError(499, "the client closed the connection before its turn; not scored", "client_closed")
            return await run_in_threadpool(work, job)

    async def batched(request: Request, work: Callable, payload: dict) -> Any:
        """Run ``work(payload)`` (which queues on a Batcher) while watching for the client to disconnect: a
        job still queued when it does is dropped (see :class:`Batcher`)."""
        gone = threading.Event()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        context = CLIENT_GONE.set(gone)
        try:
            return await run_in_threadpool(work, payload)
        finally:
            CLIENT_GONE.reset(context)
            watcher.cancel()

    @app.get("/health")
    async def health() -> dict:
        stats = server.bb.counter.stats.as_dict()
        batching = {
            name: {"requests": b.jobs, "model_calls": b.calls, "abandoned": b.abandoned}
            for name, b in (
                ("embeddings", server.embedding_batcher),
                ("next_token", server.next_token_batcher),
                ("echo", server.echo_batcher),
            )
        }
        return {
            "status": "ok",
            "model": server.name,
            "requests": server.requests,
            "abandoned": server.abandoned,
            "served": stats,
            "batching": batching,
        }

    @app.get("/v1/bbfl/info")
    async def info(request: Request) -> dict:
        await read(request)
        return server.info()

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        await read(request)
        return {"object": "list", "data": [{"id": server.name, "object": "model", "owned_by": "bbfl"}]}

    @app.post("/v1/bbfl/scores")
    async def scores(request: Request) -> Response:
        job = await run_in_threadpool(server.parse_scores, await read(request))
        out, tokens = await in_turn(request, server.scores, job)
        return Response(out, media_type=SAFETENSORS, headers={"x-bbfl-tokens": str(tokens)})

    @app.post("/v1/bbfl/features")
    async def features(request: Request) -> Response:
        job = await run_in_threadpool(server.parse_features, await read(request))
        return Response(await in_turn(request, server.features, job), media_type=SAFETENSORS)

    @app.post("/v1/bbfl/token_embeddings")
    async def token_embeddings(request: Request) -> Response:
        payload = await read_json(request)
        return Response(await run_in_threadpool(server.token_embeddings, payload), media_type=SAFETENSORS)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict:
        return await batched(request, server.embeddings, await read_json(request))

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        return await batched(request, server.completions, await read_json(request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        return await batched(request, server.chat, await read_json(request))

    return app


def serve(
    blackbox: LocalBlackBox,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    limits: ServeLimits | None = None,
) -> None:
    """Run the server until interrupted (uvicorn, one process; concurrent text requests are batched)."""
    import uvicorn

    uvicorn.run(create_app(blackbox, token, limits), host=host, port=port, log_level="warning")


def spawn_server(
    args: Sequence[str] = (), token: str | None = None, threads: int = 1, timeout: float = 120.0
) -> tuple[Any, str]:
    """Start ``bbfl serve ARGS`` as a subprocess on a free local port; return ``(process, url)`` once healthy.

    For tests, benchmarks and examples. ``token=None`` serves with ``--no-auth``. The caller stops the
    process (``terminate()``); a server that exits or stays unhealthy raises RuntimeError with its output.
    """
    import os
    import sys

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    env.pop("BBFL_SERVE_TOKEN", None)
    if token is not None:
        env["BBFL_SERVE_TOKEN"] = token  # through the environment: never on a command line other users can read
    cmd = [sys.executable, "-m", "bbfl.cli", "serve", "--port", str(port), *args]
    if token is None:
        cmd.append("--no-auth")
    url = f"http://127.0.0.1:{port}"
    return start_server_process(cmd, url, env=env, timeout=timeout), url
