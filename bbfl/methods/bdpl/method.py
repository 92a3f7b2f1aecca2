"""BDPL and FedOne: discrete prompts learned by policy gradient through a text-only black box.

Implementation based on Diao et al., "Black-box Prompt Learning for Pre-trained Language Models",
TMLR 2023 (https://arxiv.org/abs/2201.08531), and, federated, Wang et al., "FedOne: Query-Efficient
Federated Learning for Black-box Discrete Prompt Learning", ICML 2025 (https://arxiv.org/abs/2506.14929).

* The prompt is L tokens; position j is drawn from its own categorical distribution p_j over N
  candidate tokens (the rows of ``probs`` [L, N], each on the simplex).
* A step samples I prompts, scores each on the batch (I queries: one black-box call), and forms BDPL's
  variance-reduced score-function gradient g = 1/(I-1) sum_k (L_k - mean L) d_k, where d_k[j, i] =
  +1/p_{j,i} for the token prompt k chose at position j and -1/p_{j,i} for every other token (the
  official code's form; since the centred losses sum to 0 the -1/p terms cancel across the I samples,
  so g equals twice the chosen-token-only estimate up to round-off). g's L2 norm is clipped to 3, AdamW
  (lr 1e-4, weight decay 0.1) takes the step and each row is put back on the simplex.
* FedOne: each round one (or a few) sampled clients run local steps from the global ``probs`` and
  upload theirs; the server averages them weighted by examples (a convex combination stays on the
  simplex). The paper shows one active client per round is query-optimal: ``EngineConfig(clients_per_round=1)``.

Candidate tokens (:func:`candidate_vocab`): n-grams found by BDPL's PMI segmentation of the training
texts (adjacent words with PMI >= 1 are joined, up to 5 words), ranked by frequency as the official
``pmi_ngram.py`` does (it uses PMI to form the n-grams, not to rank them, and ignores labels).
Our choices, named: the projection is the exact Euclidean one (Duchi et al. 2008; the official code
bisects to a 1e-3 tolerance); FedOne clients start a fresh AdamW each round (clients keep no state);
``optimizer="sgd", grad_clip=0`` is bbfl's earlier rule (a plain step, which at lr 0.25 collapses rows).
The black box is any object with ``logits(prompts: list[str], data) -> [P, B, C]`` and ``data.labels``:
:class:`~bbfl.blackbox.openai.OpenAIBlackBox` (chat top_logprobs, label missing -> floor 0.01, or
embeddings), whose budget and cache apply.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bbfl.exceptions import ConfigError
from bbfl.federation.contract import Arrays, FederatedMethod
from bbfl.federation.headers import count, number
from bbfl.io import load_arrays, save_arrays
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


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def pmi_ngrams(
    texts: list[str], max_n: int = 5, min_count: int = 5, min_pmi: float = 1.0, freq_threshold: int = 5
) -> list[tuple[str, int]]:
    """BDPL's candidate n-grams: PMI segmentation of ``texts``, then every n-gram ranked by frequency.

    Adjacent words (a, b) are joined when both words and the pair occur more than ``min_count`` times and
    PMI = log(total_pairs * c(a, b) / (c(a) c(b))) >= ``min_pmi``; the maximal joined runs of at most
    ``max_n`` words seen more than ``min_count`` times are the n-grams; each is then counted wherever it
    occurs and kept if seen more than ``freq_threshold`` times. Returns (n-gram, count), most frequent
    first, ties alphabetical. Defaults: the official ``pmi_ngram.py``'s.
    """
    sentences = [w for w in (_words(t) for t in texts) if w]
    words = Counter(w for s in sentences for w in s)
    pairs = Counter(p for s in sentences for p in zip(s, s[1:]))
    total = sum(pairs.values())
    strong = {
        (a, b)
        for (a, b), c in pairs.items()
        if c > min_count
        and words[a] > min_count
        and words[b] > min_count
        and math.log(total * c / (words[a] * words[b])) >= min_pmi
    }
    segments: Counter = Counter()
    for s in sentences:
        run = [s[0]]
        for a, b in zip(s, s[1:]):
            if (a, b) in strong:
                run.append(b)
            else:
                segments[tuple(run)] += 1
                run = [b]
        segments[tuple(run)] += 1
    kept = {g for g, c in segments.items() if c > min_count and len(g) <= max_n}
    counts: Counter = Counter()
    for s in sentences:
        for n in range(1, max_n + 1):
            counts.update(g for g in zip(*(s[i:] for i in range(n))) if g in kept)
    ranked = sorted(((" ".join(g), c) for g, c in counts.items() if c > freq_threshold), key=lambda x: (-x[1], x[0]))
    return ranked


def candidate_vocab(texts: list[str], n: int, method: str = "pmi") -> list[str]:
    """The ``n`` candidate prompt tokens for BDPL.

    ``pmi`` (BDPL's): :func:`pmi_ngrams` of ``texts``; when the texts are too few for its thresholds,
    the list is filled with the next most frequent words (so it always has ``n`` entries when the texts
    have that many distinct words). ``frequency``: bbfl's earlier rule, the most frequent words of 3+
    letters, ties alphabetical.
    """
    if method not in ("pmi", "frequency"):
        raise ConfigError(f"candidate method should be pmi or frequency, got {method!r}")
    if method == "frequency":
        counts = Counter(w for t in texts for w in re.findall(r"[a-z]{3,}", t.lower()))
        words = sorted(counts, key=lambda w: (-counts[w], w))[:n]
    else:
        words = [g for g, _ in pmi_ngrams(texts)][:n]
        if len(words) < n:
            counts = Counter(w for t in texts for w in _words(t))
            taken = set(words)
            words += [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in taken][: n - len(words)]
    if len(words) < 2:
        raise ConfigError(f"need at least 2 candidate words for BDPL, found {len(words)} in the training texts")
    return words


def policy_gradient(probs: np.ndarray, indices: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """BDPL's variance-reduced gradient w.r.t. ``probs`` [L, N] from I sampled prompts ``indices`` [I, L].

    g = 1/(I-1) sum_k (L_k - mean L) d_k with d_k[j, i] = +1/p_{j,i} where prompt k chose token i at
    position j, -1/p_{j,i} elsewhere (the official code's derivative).
    """
    n, length = indices.shape
    centred = (losses - losses.mean()) / (n - 1)
    inverse = np.divide(1.0, probs, out=np.zeros_like(probs), where=probs > 0)  # p = 0 is never drawn: no term
    chosen = np.zeros_like(probs)
    np.add.at(chosen, (np.tile(np.arange(length), n), indices.reshape(-1)), np.repeat(centred, length))
    # every token's -1/p term (zero up to round-off, as the centred losses sum to 0), then the chosen
    # tokens' sign flipped from -1/p to +1/p
    return (2.0 * chosen - centred.sum()) * inverse


class AdamW:
    """torch.optim.AdamW's update on one numpy array (decoupled weight decay, bias-corrected moments)."""

    def __init__(self, shape: tuple[int, ...], lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8):
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.m, self.v, self.t = np.zeros(shape), np.zeros(shape), 0

    def step(self, param: np.ndarray, grad: np.ndarray) -> np.ndarray:
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad**2
        m_hat, v_hat = self.m / (1 - b1**self.t), self.v / (1 - b2**self.t)
        return param * (1 - self.lr * self.weight_decay) - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def clip_norm(grad: np.ndarray, max_norm: float) -> np.ndarray:
    """torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6) when norm > max_norm."""
    norm = float(np.linalg.norm(grad))
    return grad * (max_norm / (norm + 1e-6)) if max_norm > 0 and norm > max_norm else grad


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

    def step(self, indices: np.ndarray, losses: np.ndarray, config: BDPLConfig, optimizer: AdamW | None) -> float:
        """One BDPL step (gradient, clip, AdamW or SGD, projection); returns the unclipped gradient's norm."""
        grad = policy_gradient(self.probs, indices, losses)
        clipped = clip_norm(grad, config.grad_clip)
        stepped = self.probs - config.lr * clipped if optimizer is None else optimizer.step(self.probs, clipped)
        self.probs = project_simplex(stepped)
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


def make_optimizer(config: BDPLConfig, shape: tuple[int, ...]) -> AdamW | None:
    return AdamW(shape, config.lr, config.weight_decay) if config.optimizer == "adamw" else None


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
    optimizer = make_optimizer(config, policy.probs.shape)
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
        if optimizer is not None:  # AdamW's moments, so a resumed run ends as an uninterrupted one
            optimizer.m, optimizer.v, optimizer.t = arrays["adam_m"], arrays["adam_v"], int(state["adam_t"])
    while queries + config.samples <= config.budget:
        indices = policy.sample(rng, config.samples)
        losses, scores = _losses(blackbox, [prompt_text(i, vocab) for i in indices], train, loss_fn)
        grad_norm = policy.step(indices, losses, config, optimizer)
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
            if optimizer is not None:
                arrays.update(adam_m=optimizer.m, adam_v=optimizer.v)
                state["adam_t"] = optimizer.t
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
    it on every side (:func:`bbfl.methods.registry.build_federated_method`).
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
        optimizer = make_optimizer(self.config, policy.probs.shape)  # fresh each round: clients keep no state
        for _ in range(self.config.local_steps):
            indices = policy.sample(rng, self.config.samples)
            step_losses, _ = _losses(self.blackbox, [prompt_text(i, self.vocab) for i in indices], data, self.loss_fn)
            policy.step(indices, step_losses, self.config, optimizer)
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
