"""A hosted, OpenAI-compatible model (any ``base_url``) as a *text* black box: :class:`OpenAIBlackBox`.

Text access (DESIGN.md): ``logits(prompts: list[str] | None, data) -> [P, B, C]``, each of the P
discrete prompts prefixed to each of the B examples. Three readings of class scores
(:mod:`~bbfl.blackbox.openai.scoring`):

* ``scoring="chat"``: one chat completion per (prompt, example), ``max_tokens=1``, ``logprobs`` with
  ``top_logprobs=k``. A class's probability is the summed probability of the top-k tokens that
  equal its label word (case and surrounding space ignored); a label word absent from the top k
  gets the floor 0.01, as FedOne does (Wang et al., ICML 2025, https://arxiv.org/abs/2506.14929).
  Scores are log-probabilities.
* ``scoring="completions"``: exact label log-likelihoods from the legacy completions endpoint with
  ``echo=True, max_tokens=0, logprobs=0`` (vLLM, llama-cpp-python, OpenAI's legacy models, ``bbfl serve``
  on a causal LM; llama.cpp's own ``llama-server`` returns generated-token logprobs only, which is
  detected and refused, not misread). The example is the template cut at ``{mask}`` (as the local
  causal head reads it); for each class the text ``prefix + " " + label word`` is sent and the class
  score is the sum of the echoed ``token_logprobs`` of the tokens at or after ``len(prefix)``
  (``text_offset``): log p(label word | prefix). No floor, no top-k. Up to ``echo_batch`` texts go in
  one request (the API takes a list of prompts).
* ``scoring="embeddings"``: ``scale * cosine(embed(prompt + text), embed(label description))``, the
  sentence-encoder head of :class:`~bbfl.blackbox.LocalBlackBox` through an embeddings API.
* ``scoring="auto"``: probe the endpoint once and use the first it serves: chat with logprobs, then
  completions with echo, then embeddings (:mod:`~bbfl.blackbox.openai.blackbox`).

Cost control, because every query is paid for (:mod:`~bbfl.blackbox.openai.transport`): a :class:`QueryCounter`
budget checked before any request, a response cache keyed by the full request (chat: URL + every parameter;
embeddings and completions: URL + model + the one text, so a batch sends only unseen texts), in memory and
optionally JSON files on disk, retries on what the ``openai`` client itself retries (408, 409, 429, 5xx,
timeouts, connection errors; :mod:`bbfl.blackbox.openai.retry`) honouring ``Retry-After``, each logged with its
reason on the ``bbfl.blackbox.openai`` logger, at most ``concurrency`` requests in flight, and
:meth:`OpenAIBlackBox.cost` (requests, cache hits, retries, prompt / completion tokens). The API key comes
from ``api_key`` or ``$OPENAI_API_KEY``; it lives only in the client's headers and appears in no repr, record,
cache file, log line or error (a server that echoes it back has it masked).

Hostile or broken endpoints: every answer is read strictly (:mod:`bbfl.blackbox.openai.responses`) before it
is scored or cached: a body that is empty, not JSON, or holds a log-probability that is not a finite number
<= 0 (``"high"``, ``null``, ``1000``, ``+5``, ``NaN``), a non-finite embedding, or indices that do not match the
request is an :class:`~bbfl.exceptions.EndpointError` naming the field and the value, and nothing non-finite
is ever scored or cached. A scoring given explicitly is checked with one tiny (cached) request when the black
box is built (``verify=True``), so a route the endpoint does not serve is refused there.

Modules: ``blackbox`` (the class, its settings and capability probes), ``scoring`` (the three scorings,
:class:`TextBatch`), ``transport`` (client, budget, counters, cache, retries), ``responses`` (reading answers
safely), ``retry`` (when and how long to retry). The ``openai`` package (the ``api`` extra) is imported only
when a black box is built.
"""

from bbfl.blackbox.openai.blackbox import OpenAIBlackBox
from bbfl.blackbox.openai.responses import MalformedResponse
from bbfl.blackbox.openai.scoring import LABEL_FLOOR, Scoring, TextBatch
from bbfl.blackbox.openai.transport import CostSummary, UnsupportedEndpoint
from bbfl.exceptions import EndpointError

__all__ = [
    "LABEL_FLOOR",
    "CostSummary",
    "EndpointError",
    "MalformedResponse",
    "OpenAIBlackBox",
    "Scoring",
    "TextBatch",
    "UnsupportedEndpoint",
]
