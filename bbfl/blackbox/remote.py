"""A model served by ``bbfl serve`` as a soft-prompt black box: Language-Model-as-a-Service.

BBT was written for this setting (Sun et al., 2022, https://arxiv.org/abs/2201.03514): the client
owns the data and the optimiser, the server owns the model and returns only class scores.
:class:`RemoteBlackBox` has the interface BBT, FedBPT and ZooPFL use from :class:`~bbfl.blackbox.LocalBlackBox`
(``encode``, ``perturbed``, ``logits``, ``paired_logits``, ``token_embeddings``, ``hidden_size``,
``embedding_std``, ``counter``), so ``--model http://HOST:PORT`` is the only change a run needs. ZooPFL's
client features (mean input word embeddings) need the embedding table, which stays on the server:
:meth:`RemoteBlackBox.example_features` asks ``POST /v1/bbfl/features`` for them.

Wire format of ``POST /v1/bbfl/scores`` (both directions are safetensors bytes; nothing is pickled):

* request: tensor ``prompts`` float32 ``[P, L, H]`` (``L = 0``: no prompt) or ``[K, B, L, H]``
  (one prompt per example, ZooPFL); metadata key ``bbfl`` holds JSON ``{"task": {name, labels,
  label_words, label_descriptions, template, encoder_template}, "texts": [...], "text_pairs":
  [...] | null, "perturb": {"rate", "seed"} | null}``. The labels never leave the client.
* response: tensor ``scores`` float32 ``[P, B, C]`` (examples in request order); header
  ``x-bbfl-tokens`` (the tokens the server's model processed).

A request the server would refuse as too large (``max_request_bytes``, ``max_prompts``,
``max_examples`` from ``/v1/bbfl/info``) is split by the client: candidates first, then examples
(paired prompts travel with their examples; perturbed data is never split by example, since the
perturbation is drawn over the whole request).

``POST /v1/bbfl/features`` takes the same metadata without ``prompts`` and answers a tensor
``features`` float32 ``[B, H]``: ZooPFL's per-example features, computed from the server's embedding
table. It runs no forward and charges no queries.

The server tokenizes with its own tokenizer, so the client needs no model files; scores equal a
local run's bit for bit (``tests/test_serve.py``).
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bbfl.blackbox.base import QueryCounter
from bbfl.exceptions import BBFLError, ConfigError

if TYPE_CHECKING:
    from bbfl.data import Split, Task

TOKEN_ENV = "BBFL_SERVE_TOKEN"
TASK_FIELDS = ("name", "labels", "label_words", "label_descriptions", "template", "encoder_template")


# ---------------------------------------------------------------------- wire format (shared with bbfl.serve)
def pack(tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> bytes:
    """Tensors plus one JSON metadata entry (``bbfl``) as safetensors bytes."""
    from safetensors.torch import save

    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return save(plain, metadata=None if meta is None else {"bbfl": json.dumps(meta)})


def unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`pack`; raises ``ValueError`` on anything that is not well-formed safetensors."""
    from safetensors.torch import load

    if len(data) < 8:
        raise ValueError("body is not safetensors: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"body is not safetensors: header length {n} > body size {len(data) - 8}")
    try:
        header = json.loads(data[8 : 8 + n])
        meta = json.loads((header.get("__metadata__") or {}).get("bbfl", "{}"))
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error type; json raises ValueError
        raise ValueError(f"body is not valid safetensors: {exc}") from exc
    return tensors, meta


def task_spec(task: Task) -> dict[str, Any]:
    """The parts of a task the server needs to phrase and score examples (no data, no labels)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((f, getattr(task, f)) for f in TASK_FIELDS)}


@dataclass
class RemoteEncoded:
    """A split as a remote black box holds it: the texts to send and the labels kept on the client."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: torch.Tensor
    task: dict[str, Any]
    perturb: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: torch.Tensor | list[int]) -> RemoteEncoded:
        idx = [int(i) for i in torch.as_tensor(indices).flatten()]
        pairs = None if self.text_pairs is None else [self.text_pairs[i] for i in idx]
        return RemoteEncoded([self.texts[i] for i in idx], pairs, self.labels[idx], self.task, self.perturb)

    def request_meta(self) -> dict[str, Any]:
        return {"task": self.task, "texts": self.texts, "text_pairs": self.text_pairs, "perturb": self.perturb}


class RemoteBlackBox:
    """Client of ``bbfl serve``: scores candidate soft prompts on a model that runs elsewhere.

    Parameters
    ----------
    url : ``http://HOST:PORT`` of the server.
    token : the server's bearer token; default ``$BBFL_SERVE_TOKEN``. It is kept only in the HTTP
        client's headers (never in ``model_name``, ``repr`` or a run's config).
    budget : hard cap on queries (one candidate on one batch), checked before a request is sent.
    timeout : seconds per HTTP request.
    retries : attempts more on connection errors and 502/503/504 (with backoff).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        budget: int | None = None,
        timeout: float = 300.0,
        retries: int = 2,
    ) -> None:
        try:
            import httpx
        except ImportError as exc:  # pragma: no cover - an optional extra
            raise ConfigError("a remote model needs `pip install 'bbfl[serve]'` (httpx)") from exc
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"remote model URL must start with http:// or https://, got {url!r}")
        self.model_name = url.rstrip("/")
        self.counter = QueryCounter(budget)
        self.feature_requests = 0  # POST /v1/bbfl/features: no forward, so outside the query budget
        self.retries = retries
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.model_name, headers=headers, timeout=timeout)
        self.info = self._request("GET", "/v1/bbfl/info").json()
        self.head = self.info["head"]
        self.prompt_attention = self.info["prompt_attention"]
        self.prompt_placement = self.info.get("prompt_placement", "inputs_embeds")  # older servers: inputs_embeds
        self.served_model = self.info["model"]
        self.device = torch.device("cpu")  # where the returned scores live

    def __repr__(self) -> str:
        return f"RemoteBlackBox({self.model_name!r}, served_model={self.served_model!r}, head={self.head!r})"

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ model facts (from /v1/bbfl/info)
    @property
    def hidden_size(self) -> int:
        return int(self.info["hidden_size"])

    @property
    def embedding_std(self) -> float:
        return float(self.info["embedding_std"])

    @property
    def limits(self) -> dict[str, int]:
        """The server's request limits (``/v1/bbfl/info``); the client splits requests to stay within them."""
        return self.info["limits"]

    @property
    def word_embeddings(self) -> torch.nn.Embedding:
        raise ConfigError(
            "a served model does not expose its embedding table; what the methods need from it is asked of "
            "the server (ZooPFL's features: RemoteBlackBox.example_features), or use a local --model"
        )

    def token_embeddings(self, text_or_token: str, length: int) -> torch.Tensor:
        """[length, H] embeddings of a token repeated / a text cycled (BBT's p0), asked of the server."""
        resp = self._request("POST", "/v1/bbfl/token_embeddings", json={"text": text_or_token, "length": length})
        return unpack(resp.content)[0]["embeddings"].float()

    def example_features(self, data: RemoteEncoded) -> torch.Tensor:
        """[B, H] ZooPFL's features of ``data`` (:func:`bbfl.methods.zoopfl.example_features`), from the server.

        Not a query of the model (no forward, no budget): counted in ``feature_requests``. Features are
        per example, so splitting a big split into ``max_examples`` requests changes no number.
        """
        if len(data) == 0:
            return torch.zeros(0, self.hidden_size)
        step = int(self.limits["max_examples"]) if data.perturb is None else len(data)
        parts = []
        for start in range(0, len(data), step):
            part = data if step >= len(data) else data.subset(list(range(start, min(start + step, len(data)))))
            resp = self._post("/v1/bbfl/features", pack({}, part.request_meta()))
            self.feature_requests += 1
            parts.append(unpack(resp.content)[0]["features"].float())
        return torch.cat(parts, 0)

    # ------------------------------------------------------------------ data
    def encode(self, task: Task, split: Split) -> RemoteEncoded:
        """Keep the texts to send (the server tokenizes, and caches, them) and the labels (never sent)."""
        pairs = None if split.text_pairs is None else list(split.text_pairs)
        labels = torch.as_tensor(np.asarray(split.labels), dtype=torch.long)
        # phrased for the server's head here: the wire carries one template and one set of label words
        return RemoteEncoded(list(split.texts), pairs, labels, task_spec(task.for_head(self.head)))

    def perturbed(self, data: RemoteEncoded, rate: float, seed: int) -> RemoteEncoded:
        """FedBPT's token-perturbed copy; the server applies it with its tokenizer (same as a local run)."""
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"perturbation rate must be in [0, 1], got {rate}")
        return RemoteEncoded(data.texts, data.text_pairs, data.labels, data.task, {"rate": rate, "seed": seed})

    # ------------------------------------------------------------------ scoring
    def logits(self, prompts: torch.Tensor | None, data: RemoteEncoded) -> torch.Tensor:
        """[P, B, C] class scores of P candidate prompts ([P, L, H]; ``None`` = no prompt). Counts P queries."""
        if prompts is None:
            prompts = torch.zeros(1, 0, self.hidden_size)
        if prompts.dim() != 3:
            raise ConfigError(f"prompts must be [P, L, H], got {tuple(prompts.shape)}")
        return self._scores(prompts, data)

    def paired_logits(self, prompts: torch.Tensor, data: RemoteEncoded) -> torch.Tensor:
        """[K, B, C] scores where example b reads its own prompt ``prompts[k, b]`` ([K, B, L, H])."""
        if prompts.dim() != 4 or prompts.shape[1] != len(data):
            raise ConfigError(f"paired prompts must be [K, {len(data)}, L, H], got {tuple(prompts.shape)}")
        return self._scores(prompts, data)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise ConfigError(
            "white-box tuning needs gradients, and a served model returns only scores: use a local --model"
        )

    def _scores(self, prompts: torch.Tensor, data: RemoteEncoded) -> torch.Tensor:
        n_cand = prompts.shape[0]
        step = max(1, int(self.limits["max_prompts"]))  # split a population the server would refuse
        with self.counter.charge(queries=n_cand, examples=n_cand * len(data), tokens=0):
            parts = [self._scores_request(prompts[start : start + step], data) for start in range(0, n_cand, step)]
        return torch.cat(parts, 0)

    def _scores_request(self, prompts: torch.Tensor, data: RemoteEncoded) -> torch.Tensor:
        """[P, B, C] scores in one request, or in halves where the server would refuse it (413, or 422 on B).

        ZooPFL's paired prompts ([K, B, L, H]) grow with B: a client with many examples on a wide model
        would pass ``max_request_bytes``. Requests within the limits are sent unchanged (same numbers as before).
        """
        body = pack({"prompts": prompts.float()}, data.request_meta())
        too_many = len(data) > int(self.limits["max_examples"])
        too_big = len(body) > int(self.limits["max_request_bytes"])
        if too_big and not too_many and prompts.shape[0] > 1:
            half = prompts.shape[0] // 2
            return torch.cat([self._scores_request(prompts[:half], data), self._scores_request(prompts[half:], data)])
        if (too_big or too_many) and len(data) > 1 and data.perturb is None:
            return self._scores_by_example_halves(prompts, data)
        resp = self._post("/v1/bbfl/scores", body)  # within the limits, or not splittable: the server says why
        self.counter.stats.tokens += int(resp.headers.get("x-bbfl-tokens", 0))
        return unpack(resp.content)[0]["scores"]

    def _scores_by_example_halves(self, prompts: torch.Tensor, data: RemoteEncoded) -> torch.Tensor:
        """The examples in two requests (or more); paired prompts ([K, B, L, H]) go with their examples."""
        cut, parts = len(data) // 2, []
        for idx in (list(range(cut)), list(range(cut, len(data)))):
            part = prompts[:, idx] if prompts.dim() == 4 else prompts
            parts.append(self._scores_request(part, data.subset(idx)))
        return torch.cat(parts, 1)

    def _post(self, path: str, body: bytes):
        return self._request("POST", path, content=body, headers={"Content-Type": "application/octet-stream"})

    def _request(self, method: str, path: str, **kwargs: Any):
        import httpx

        for attempt in range(self.retries + 1):
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise BBFLError(f"cannot reach bbfl serve at {self.model_name}: {exc}") from exc
            else:
                if resp.status_code not in (502, 503, 504) or attempt == self.retries:
                    break
            time.sleep(0.5 * 2**attempt)
        if resp.status_code == 401:
            raise ConfigError(
                f"{self.model_name} rejected the bearer token: set ${TOKEN_ENV} to the token `bbfl serve` was given"
            )
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except Exception:
                message = resp.text[:300]
            raise ConfigError(f"bbfl serve at {self.model_name} answered {resp.status_code}: {message}")
        return resp
