""":class:`OpenAIBlackBox`: a hosted, OpenAI-compatible model as a text black box, composed of the request side
(:class:`~bbfl.blackbox.openai.transport.Transport`) and the scorings (:class:`~bbfl.blackbox.openai.scoring.Scorer`),
with its settings, its record, and the probes that find which scorings an endpoint serves.

``scoring="auto"`` probes the endpoint once and uses the first it serves: chat with logprobs, then completions
with echo, then embeddings. A scoring given explicitly is checked with one tiny (cached) request when the black
box is built (``verify=True``), so a route the endpoint does not serve is refused there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from bbfl.blackbox.openai.responses import MalformedResponse
from bbfl.blackbox.openai.scoring import LABEL_FLOOR, Scorer, Scoring, _top_logprobs
from bbfl.blackbox.openai.transport import ROUTE_NEEDS, Transport, UnsupportedEndpoint, log
from bbfl.exceptions import ConfigError

# scoring="auto": the first of these (scoring, capability) the endpoint serves; richer signals first
AUTO_ORDER = (("chat", "chat"), ("completions", "completions_echo"), ("embeddings", "embeddings"))
ECHO_PROBE = "Hello world"  # two tokens or more in any vocabulary: the second gets an echoed log-probability
# what a scoring needs, as capabilities() names it
CAPABILITIES = ("embeddings", "chat", "completions_echo")
SCORING_CAPABILITY = {"chat": "chat", "completions": "completions_echo", "embeddings": "embeddings"}

__all__ = ["OpenAIBlackBox"]


class OpenAIBlackBox(Scorer, Transport):
    """Scores discrete prompts on an OpenAI-compatible endpoint, within a hard query budget.

    Parameters
    ----------
    model : model name sent with every request.
    base_url : the API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
    api_key : default ``$OPENAI_API_KEY`` (a local server without auth accepts any placeholder).
    scoring : ``chat``, ``completions``, ``embeddings`` or ``auto`` (see :mod:`bbfl.blackbox.openai`).
    budget : hard cap on queries (one prompt on one batch, BBT's unit), checked before any request.
    top_logprobs : k for chat scoring (OpenAI allows up to 20).
    label_floor : probability given to a label word that is not among the top k (FedOne: 0.01);
        every label probability is at least this.
    mask_text : what fills the template's ``{mask}`` for chat scoring (``[MASK]`` suits ``bbfl serve``'s
        masked LMs; a chat model may want ``___``); ``instruction`` is appended to each message. Chat only:
        completions scoring cuts the template at ``{mask}`` and puts the label word there.
    similarity_scale : embeddings scoring's ``scale * cosine`` (as the local encoder head).
    concurrency : requests in flight at once. retries / backoff / max_wait : on 408, 409, 429, 5xx, timeouts
        and connection errors wait ``Retry-After`` if the server sent a finite one, else
        ``backoff * 2**attempt`` (- jitter), at most ``max_wait``; a server asking for more than ``max_wait``
        is not retried (the ``openai`` client's rule). Each retry is logged with its reason.
    timeout : seconds per request. cache_dir : also keep responses as JSON files there (survives runs).
    embed_batch / echo_batch : texts per embeddings / completions request.
    verify : with ``scoring`` given (not ``auto``), send one tiny request now to check the endpoint serves it
        (refused with :class:`UnsupportedEndpoint` otherwise). ``False`` skips it: a run rebuilding a black
        box whose scoring was checked when the run started.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        scoring: Scoring = "auto",
        budget: int | None = None,
        top_logprobs: int = 20,
        label_floor: float = LABEL_FLOOR,
        mask_text: str = "[MASK]",
        instruction: str = "",
        similarity_scale: float = 20.0,
        concurrency: int = 4,
        retries: int = 4,
        backoff: float = 0.5,
        max_wait: float = 60.0,
        timeout: float = 60.0,
        cache_dir: str | Path | None = None,
        embed_batch: int = 64,
        echo_batch: int = 32,
        verify: bool = True,
    ) -> None:
        try:
            import openai  # noqa: F401  (the client itself is built by Transport._init_transport)
        except ImportError as exc:  # pragma: no cover - an optional extra
            raise ConfigError("an OpenAI-compatible black box needs `pip install 'bbfl[api]'` (openai)") from exc
        if scoring not in ("auto", "chat", "completions", "embeddings"):
            raise ConfigError(f"`scoring` must be auto, chat, completions or embeddings, got {scoring!r}")
        if not 1 <= top_logprobs <= 20:
            raise ConfigError(f"`top_logprobs` must be in [1, 20], got {top_logprobs}")
        if not 0.0 < label_floor < 1.0:
            raise ConfigError(f"`label_floor` must be in (0, 1), got {label_floor}")
        if concurrency < 1 or retries < 0 or embed_batch < 1 or echo_batch < 1:
            raise ConfigError(
                "need concurrency >= 1, retries >= 0, embed_batch >= 1, echo_batch >= 1; "
                f"got {concurrency}, {retries}, {embed_batch}, {echo_batch}"
            )
        for name, value in (("timeout", timeout), ("backoff", backoff), ("max_wait", max_wait)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"`{name}` must be a finite number of seconds >= 0, got {value!r}")
        if not math.isfinite(similarity_scale):
            raise ConfigError(f"`similarity_scale` must be finite, got {similarity_scale!r}")
        self.model, self.base_url = model, base_url
        self._init_transport(
            base_url=base_url,
            api_key=api_key,
            budget=budget,
            concurrency=concurrency,
            retries=retries,
            backoff=backoff,
            max_wait=max_wait,
            timeout=timeout,
            cache_dir=cache_dir,
        )
        self.top_logprobs, self.mask_text, self.instruction = top_logprobs, mask_text, instruction
        self.label_floor = label_floor
        self.similarity_scale, self.embed_batch = similarity_scale, embed_batch
        self.echo_batch = echo_batch
        self._label_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.scoring = self._pick_scoring() if scoring == "auto" else scoring
        if scoring != "auto" and verify:
            self._verify(scoring)

    def __repr__(self) -> str:  # no key here, ever
        return f"OpenAIBlackBox(model={self.model!r}, base_url={self.base_url!r}, scoring={self.scoring!r})"

    def record(self) -> dict[str, Any]:
        """Settings for a run's config.json (the API key is not one of them)."""
        return {
            "kind": "openai",
            "model": self.model,
            "base_url": self.base_url,
            "scoring": self.scoring,
            "top_logprobs": self.top_logprobs,
            "label_floor": self.label_floor,
            "mask_text": self.mask_text,
            "instruction": self.instruction,
            "budget": self.counter.budget,
        }

    # ------------------------------------------------------------------ capabilities
    def capabilities(self) -> dict[str, bool]:
        """Which scorings the endpoint supports, found with one tiny request each (counted in :meth:`cost`)."""
        return {capability: self._missing(capability) is None for capability in CAPABILITIES}

    def _missing(self, capability: str) -> str | None:
        """Why the endpoint does not serve ``capability`` (one probe request), or ``None`` when it does. A route
        that answers something unreadable counts as not served; a dead endpoint raises."""
        try:
            if capability == "embeddings":
                self._probe("embeddings", {"model": self.model, "input": ["ping"], "encoding_format": "float"})
            elif capability == "chat":
                if not _top_logprobs(
                    self._probe("chat", self._chat_request("ping", max(1, min(self.top_logprobs, 2))))
                ):
                    return f"{self._where} answered a chat completion without logprobs"
            else:
                return self._echo_missing()
        except (UnsupportedEndpoint, MalformedResponse) as exc:
            log.info("%s: no %s (%s)", self._where, capability, exc)
            return str(exc)
        return None

    def _verify(self, scoring: str) -> None:
        reason = self._missing(SCORING_CAPABILITY[scoring])
        if reason is not None:
            raise UnsupportedEndpoint(
                f"scoring={scoring!r} needs {ROUTE_NEEDS[scoring]}, which {self._where} does not serve for model "
                f"{self.model!r} ({reason}); use scoring='auto' to take what it serves"
            )

    def _echo_missing(self) -> str | None:
        try:
            (row,) = self._echo_rows(self._probe("completions", self._echo_request([ECHO_PROBE])), [ECHO_PROBE])
        except UnsupportedEndpoint as exc:
            return str(exc)
        except MalformedResponse as exc:
            return f"its completions answer is unreadable: {exc}"
        if all(lp is None for lp in row["token_logprobs"]):
            return f"{self._where} echoed no prompt log-probabilities"
        return None

    def _pick_scoring(self) -> str:
        found = self.capabilities()
        for scoring, capability in AUTO_ORDER:
            if found[capability]:
                return scoring
        raise ConfigError(
            f"{self._where} serves neither chat completions with logprobs, legacy completions with echo, "
            f"nor embeddings for model {self.model!r}"
        )
