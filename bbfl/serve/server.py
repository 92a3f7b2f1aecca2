"""The model side of ``bbfl serve``: :class:`Server` (the served black box, its lock, batchers, encoding
cache and counters), the request limits (:class:`ServeLimits`) and the soft-prompt scoring and features
that bbfl's own ``/v1/bbfl/*`` endpoints serve.

The OpenAI-compatible methods come from the :class:`~bbfl.serve.openai_compat.OpenAICompatible` mixin; the
HTTP layer that calls all of them is :mod:`bbfl.serve.app`. Nothing here imports FastAPI.
"""

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bbfl.blackbox import LocalBlackBox
from bbfl.blackbox.remote import TASK_FIELDS, pack, unpack
from bbfl.data import Split, Task
from bbfl.exceptions import BBFLError
from bbfl.serve import validate
from bbfl.serve.batching import Batcher
from bbfl.serve.openai_compat import OpenAICompatible
from bbfl.serve.validate import APIError, Perturb

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # what the embedded default model is


@dataclass
class ServeLimits:
    """What one request may ask for; more gets a 413 (bytes) or 422 (counts) naming the limit."""

    max_request_bytes: int = 32 * 2**20
    max_prompts: int = 256  # candidates P per /v1/bbfl/scores request (the client splits bigger populations)
    max_examples: int = 1024  # examples B per scores request, inputs per embeddings / completions request
    max_top_logprobs: int = 20  # OpenAI's own cap
    max_prompt_length: int = 256  # L: soft-prompt tokens (they add to the model's position budget)
    max_batch_texts: int = 64  # texts per batched forward, summed over the concurrent requests merged into it
    next_token_group_tokens: int = 4096  # padded tokens per forward of a next-token batch (sorted by length)
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


class Server(OpenAICompatible):
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


def public_model_name(model: str) -> str:
    """The name /health, /v1/models and error messages show: a hub id as given, a local directory by its
    last component (its absolute path tells a client about the server's file system, nothing about the model)."""
    from pathlib import Path

    from bbfl.blackbox import default_model_path

    if model == default_model_path():
        return DEFAULT_MODEL_NAME
    path = Path(model)
    return path.name if (path.is_absolute() or path.exists()) and path.name else model
