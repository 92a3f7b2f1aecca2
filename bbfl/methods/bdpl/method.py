"""BDPL and FedOne: discrete prompts learned by policy gradient through a text-only black box.

Implementation based on Diao et al., "Black-box Prompt Learning for Pre-trained Language Models",
TMLR 2023 (https://arxiv.org/abs/2201.08531), and, federated, Wang et al., "FedOne: Query-Efficient
Federated Learning for Black-box Discrete Prompt Learning", ICML 2025 (https://arxiv.org/abs/2506.14929).

* The prompt is L tokens; position j is drawn from its own categorical distribution p_j over N
  candidate tokens (the rows of ``probs`` [L, N], each on the simplex).
* A step samples I prompts, scores each on the batch (I queries: one black-box call), and follows
  the variance-reduced score-function gradient
  g = 1/(I-1) sum_k (L_k - mean L) grad_p log P(prompt_k), with grad_{p_j} log P = e_{i_kj} / p_{j,i_kj};
  then p <- proj_simplex(p - lr g), row by row (Euclidean projection, Duchi et al. 2008).
* FedOne: each round one (or a few) sampled clients run local steps from the global ``probs`` and
  upload theirs; the server averages them weighted by examples (a convex combination stays on the
  simplex). The paper shows one active client per round is query-optimal: ``EngineConfig(clients_per_round=1)``.

Our choices: the candidate tokens default to the N most frequent training words (BDPL ranks n-grams by
PMI), and ``lr`` is ours (tune it: the gradient scales with 1/p, so it is large while p is uniform).
The black box is any object with ``logits(prompts: list[str], data) -> [P, B, C]`` and ``data.labels``:
:class:`~bbfl.blackbox.openai_api.OpenAIBlackBox` (chat top_logprobs, label missing -> floor 0.01, or
embeddings), whose budget and cache apply.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bbfl.exceptions import ConfigError
from bbfl.federation.headers import count, number
from bbfl.io import load_arrays, save_arrays
from bbfl.methods.base import Arrays, FederatedMethod
from bbfl.methods.bdpl.config import BDPLConfig
from bbfl.methods.losses import accuracy, get_loss


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of ``v`` onto the probability simplex (sort-based, O(N log N)).

    >>> project_simplex(np.array([[0.5, 0.5], [2.0, 0.0], [0.3, -0.1]])).round(3).tolist()
    [[0.5, 0.5], [1.0, 0.0], [0.7, 0.3]]
    """
    v = np.atleast_2d(np.asarray(v, dtype=np.float64))
    u = -np.sort(-v, axis=1)
    css = np.cumsum(u, axis=1) - 1.0
    ranks = np.arange(1, v.shape[1] + 1)
    rho = np.count_nonzero(u - css / ranks > 0, axis=1)  # the condition holds for a prefix of the ranks
    theta = css[np.arange(len(v)), rho - 1] / rho
    return np.maximum(v - theta[:, None], 0.0)


def candidate_vocab(texts: list[str], n: int) -> list[str]:
    """The ``n`` most frequent words (lowercase, 3+ letters) of ``texts``, ties in alphabetical order."""
    counts = Counter(w for t in texts for w in re.findall(r"[a-z]{3,}", t.lower()))
    words = sorted(counts, key=lambda w: (-counts[w], w))[:n]
    if len(words) < 2:
        raise ConfigError(f"need at least 2 candidate words for BDPL, found {len(words)} in the training texts")
    return words


class PromptPolicy:
    """Independent categorical distributions over candidate tokens, one per prompt position."""

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = project_simplex(probs)

    @classmethod
    def uniform(cls, length: int, num_candidates: int) -> PromptPolicy:
        return cls(np.full((length, num_candidates), 1.0 / num_candidates))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """[n, L] token indices, position j drawn from ``probs[j]`` (inverse CDF, one uniform per draw)."""
        cdf = np.cumsum(self.probs, axis=1)
        cdf[:, -1] = 1.0  # round-off must not leave a gap at the top
        u = rng.random((n, self.probs.shape[0]))
        return np.stack([np.searchsorted(cdf[j], u[:, j], side="right") for j in range(cdf.shape[0])], axis=1)

    def step(self, indices: np.ndarray, losses: np.ndarray, lr: float) -> float:
        """One variance-reduced policy-gradient step; returns the gradient's norm."""
        n, length = indices.shape
        centred = losses - losses.mean()  # baseline: the mean loss of the I samples
        rows = np.arange(length)
        grad = np.zeros_like(self.probs)
        for k in range(n):  # grad_p log P(prompt_k) = e_{i_kj} / p_{j, i_kj} at each position j
            np.add.at(grad, (rows, indices[k]), centred[k] / self.probs[rows, indices[k]])
        grad /= n - 1
        self.probs = project_simplex(self.probs - lr * grad)
        return float(np.linalg.norm(grad))

    def most_likely(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def prompt_text(indices: np.ndarray, vocab: list[str]) -> str:
    """The prompt a text API sees: the chosen words, space-separated, before the example."""
    return " ".join(vocab[int(i)] for i in indices) + " "


@dataclass
class BDPLResult:
    prompt: str  # the dev-selected most likely prompt
    indices: np.ndarray
    dev_accuracy: float
    train_queries: int
    probs: np.ndarray
    history: list[dict] = field(default_factory=list)


def _losses(blackbox: Any, prompts: list[str], data: Any, loss_fn: Callable) -> tuple[np.ndarray, Any]:
    scores = blackbox.logits(prompts, data)
    return loss_fn(scores, data.labels).cpu().numpy().astype(np.float64), scores


def run_bdpl(
    config: BDPLConfig,
    blackbox: Any,
    train: Any,
    dev: Any,
    vocab: list[str],
    loss_name: str = "ce",
    on_step: Callable[[dict], None] | None = None,
    checkpoint: str | Path | None = None,
) -> BDPLResult:
    """Centralised BDPL: policy-gradient steps until the next would pass ``config.budget`` queries.

    Every ``config.eval_every`` training queries the most likely prompt is scored on ``dev``; the best
    one is kept (dev checks cost one query each and are counted apart, as BBT's are).
    ``checkpoint``: a safetensors file written after every step (probabilities, best prompt, sampler
    state, history); if it exists the run continues from it and ends exactly as an uninterrupted one.
    """
    loss_fn = get_loss(loss_name, config.margin)
    rng = np.random.default_rng(config.seed)
    policy = PromptPolicy.uniform(config.prompt_length, len(vocab))
    best: dict[str, Any] = {"acc": -1.0, "indices": policy.most_likely()}
    queries, next_eval, history = 0, config.eval_every, []
    if checkpoint is not None and Path(checkpoint).is_file():
        arrays, meta = load_arrays(checkpoint)
        state = json.loads(meta["bdpl"])
        if arrays["probs"].shape != policy.probs.shape:
            raise ConfigError(f"{checkpoint} holds a {arrays['probs'].shape} policy, not {policy.probs.shape}")
        policy.probs = arrays["probs"].astype(np.float64)  # as saved (float64): no re-projection
        best = {"acc": float(state["best_acc"]), "indices": arrays["best_indices"]}
        queries, next_eval, history = int(state["queries"]), int(state["next_eval"]), list(state["history"])
        rng.bit_generator.state = state["rng"]
    while queries + config.samples <= config.budget:
        indices = policy.sample(rng, config.samples)
        losses, scores = _losses(blackbox, [prompt_text(i, vocab) for i in indices], train, loss_fn)
        grad_norm = policy.step(indices, losses, config.lr)
        queries += config.samples
        record = {
            "step": len(history) + 1,
            "queries": queries,
            "train_loss_mean": float(losses.mean()),
            "train_loss": float(losses.min()),
            "train_accuracy": float(accuracy(scores, train.labels).max()),
            "grad_norm": grad_norm,
            "max_prob": float(policy.probs.max(axis=1).mean()),
        }
        if queries >= next_eval or queries + config.samples > config.budget:
            top = policy.most_likely()
            acc = float(accuracy(blackbox.logits([prompt_text(top, vocab)], dev), dev.labels)[0])
            if acc > best["acc"]:
                best = {"acc": acc, "indices": top}
            record.update(dev_accuracy=acc, best_dev_accuracy=best["acc"])
            next_eval += config.eval_every * max(1, (queries - next_eval) // config.eval_every + 1)
        history.append(record)
        if checkpoint is not None:
            state = {"best_acc": best["acc"], "queries": queries, "next_eval": next_eval, "history": history}
            state["rng"] = rng.bit_generator.state
            arrays = {"probs": policy.probs, "best_indices": np.asarray(best["indices"], dtype=np.int64)}
            save_arrays(checkpoint, arrays, {"bdpl": json.dumps(state)})
        if on_step is not None:
            on_step(record)
    return BDPLResult(prompt_text(best["indices"], vocab), best["indices"], best["acc"], queries, policy.probs, history)


def fedone_round_queries(config: BDPLConfig, clients_per_round: int) -> int:
    """API queries of one FedOne round: each active client's steps, then one evaluation of the global prompt."""
    return clients_per_round * config.local_steps * config.samples + 1


def fedone_plan(config: BDPLConfig, rounds: int, clients_per_round: int) -> int:
    """API queries a FedOne run makes at most: zero-shot and round 0's evaluation, then ``rounds`` rounds
    (no drop-outs)."""
    return 2 + rounds * fedone_round_queries(config, clients_per_round)


class FedOne(FederatedMethod):
    """FedOne: clients run BDPL steps from the global prompt distribution; the server averages them.

    The client data are whatever ``blackbox.encode`` returned (e.g. a :class:`TextBatch`). Clients keep no
    private state, so on Flower a SuperNode's ``Context`` holds nothing for FedOne; the run's config builds
    it on every side (:func:`bbfl.pipeline.build_federated_method`).
    """

    def __init__(self, config: BDPLConfig, blackbox: Any, clients: list, test: Any, vocab: list[str], loss_name: str):
        self.config, self.blackbox, self.clients, self.test, self.vocab = config, blackbox, clients, test, vocab
        self.loss_fn = get_loss(loss_name, config.margin)
        self.num_clients = len(clients)
        self._reset()

    def _reset(self) -> None:
        self.policy = PromptPolicy.uniform(self.config.prompt_length, len(self.vocab))
        self.train_queries = 0

    def downlink(self, round_: int) -> tuple[Arrays, dict]:
        return {"probs": self.policy.probs.astype(np.float32)}, {"round": round_}

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"probs": (self.config.prompt_length, len(self.vocab))}

    def client_update(self, client: int, round_: int, arrays: Arrays, header: dict, seed: int):
        rng = np.random.default_rng(seed)
        policy = PromptPolicy(arrays["probs"].astype(np.float64))  # re-projected: the wire may be float16
        data, losses = self.clients[client], []
        for _ in range(self.config.local_steps):
            indices = policy.sample(rng, self.config.samples)
            step_losses, _ = _losses(self.blackbox, [prompt_text(i, self.vocab) for i in indices], data, self.loss_fn)
            policy.step(indices, step_losses, self.config.lr)
            losses.append(float(step_losses.mean()))
        return {"probs": policy.probs.astype(np.float32)}, {"examples": len(data), "loss": float(np.mean(losses))}

    def header_spec(self, client: int) -> dict:
        """What an update header must hold (checked by the engine before :meth:`aggregate`)."""
        return {"examples": count(1, len(self.clients[client])), "loss": number()}

    def aggregate(self, round_: int, updates: list[tuple[int, Arrays, dict]]) -> dict:
        weights = np.array([h["examples"] for _, _, h in updates], dtype=np.float64)
        stacked = np.stack([u["probs"].astype(np.float64) for _, u, _ in updates])
        self.policy = PromptPolicy(np.tensordot(weights / weights.sum(), stacked, axes=1))
        # counted here, not in client_update: on Flower the clients run in other processes, and a count
        # the server derives from the config cannot be inflated by a client's header
        self.train_queries += len(updates) * self.config.local_steps * self.config.samples
        return {"client_loss_mean": float(np.mean([h["loss"] for _, _, h in updates]))}

    def evaluate(self, round_: int) -> dict:
        """The most likely prompt's test accuracy (one query)."""
        prompt = prompt_text(self.policy.most_likely(), self.vocab)
        scores = self.blackbox.logits([prompt], self.test)
        return {
            "test_accuracy": float(accuracy(scores, self.test.labels)[0]),
            "train_queries": self.train_queries,
            "prompt": prompt,
            "max_prob": float(self.policy.probs.max(axis=1).mean()),
        }

    def state(self) -> tuple[Arrays, dict]:
        return {"probs": self.policy.probs}, {"train_queries": self.train_queries}

    def load_state(self, arrays: Arrays, header: dict) -> None:
        self.policy = PromptPolicy(arrays["probs"])
        self.train_queries = int(header["train_queries"])
