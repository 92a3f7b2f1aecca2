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

The package: :mod:`bbfl.serve.app` (the FastAPI app, :func:`serve`, :func:`spawn_server`),
:mod:`bbfl.serve.server` (:class:`Server`: the model, its lock, the soft-prompt scoring; :class:`ServeLimits`),
:mod:`bbfl.serve.openai_compat` (the OpenAI-compatible answers), :mod:`bbfl.serve.batching` (:class:`Batcher`)
and :mod:`bbfl.serve.validate` (the request checks). Importing it does not import FastAPI or uvicorn.
"""

from bbfl.serve.app import SAFETENSORS, CatchAll, create_app, serve, spawn_server
from bbfl.serve.batching import CLIENT_GONE, Batcher
from bbfl.serve.server import DEFAULT_MODEL_NAME, ScoresRequest, ServeLimits, Server, public_model_name

__all__ = [
    "CLIENT_GONE",
    "DEFAULT_MODEL_NAME",
    "SAFETENSORS",
    "Batcher",
    "CatchAll",
    "ScoresRequest",
    "ServeLimits",
    "Server",
    "create_app",
    "public_model_name",
    "serve",
    "spawn_server",
]
