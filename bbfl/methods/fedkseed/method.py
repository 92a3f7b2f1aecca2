"""FedKSeed: federated zeroth-order tuning where every update is (seed, scalar) pairs from K seeds.

Qin et al., ICML 2024. The server and every client share ``num_seeds`` direction seeds and the
initial PEFT weights w0 (both from the config's seed, so nothing but K numbers ever travels):

* a client rebuilds the global weights w = w0 - sum_k c_k z_k by *replay* from the K global
  coefficients c (the download: K floats, whatever the model size or the number of rounds);
* it runs ``local_steps`` MeZO steps, each picking a seed k (uniformly, or by FedKSeed-Pro's
  importance), s = (L(w + eps z_k) - L(w - eps z_k)) / 2 eps on a batch, w -= lr s z_k, and adds s
  into its k-th accumulator (the upload: K floats);
* the server averages the accumulators (weighted by client data size) and sets c += lr * mean.
* FedKSeed-Pro (``pro``): the server keeps, per seed, the history of every scalar clients reported
  (starting from one 0, as the official ``grad_initial``) - as a sum of |clip(s)| and a count, which is
  all the official rule reads - and sends P = softmax(min-max(mean |clip(s)|)) down with c (K more
  floats); a client also uploads its per-seed sums of |clip(s)| and step counts (2K more floats).

Replay is bit-for-bit reproducible on any machine: z_k comes from the counter-based generator in
:mod:`bbfl.optim.zeroth_order` and the coefficients are applied in a fixed order in fp32.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from bbfl.blackbox import Encoded, LocalBlackBox
from bbfl.exceptions import ConfigError
from bbfl.federation.contract import Arrays, FederatedMethod
from bbfl.federation.headers import count
from bbfl.federation.wire import InvalidUpdate
from bbfl.memory import peak_memory_mb
from bbfl.methods.fedkseed.config import FedKSeedConfig
from bbfl.methods.fwdllm.method import sample_batch
from bbfl.methods.losses import accuracy
from bbfl.optim.zeroth_order import apply_seed_update, central_difference, warn_if_step_unresolved
from bbfl.peft import PeftWeights


def replay(initial: dict[str, np.ndarray], coefficients: np.ndarray, pool_seed: int) -> list[torch.Tensor]:
    """w0 - sum_k c_k z_k, applied seed by seed in increasing k, in fp32 (identical on every machine)."""
    params = [torch.from_numpy(np.array(v, dtype=np.float32)) for v in initial.values()]
    for k in np.flatnonzero(coefficients):
        apply_seed_update(params, pool_seed, int(k), float(coefficients[k]), lr=1.0)
    return params


def seed_probabilities(abs_sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """FedKSeed-Pro's P(k): softmax over seeds of the min-max-normalised amp_k = mean |clip(s)| of seed k.

    ``abs_sums[k]``: the sum of |clip(s)| over seed k's history; ``counts[k]``: its length (>= 1: the
    history starts with one 0). Min-max uses the official 1e-10 guard, so equal amps give uniform P.
    """
    amp = np.asarray(abs_sums, dtype=np.float64) / np.asarray(counts, dtype=np.float64)
    normalised = (amp - amp.min()) / (amp.max() - amp.min() + 1e-10)
    weights = np.exp(normalised - normalised.max())
    return weights / weights.sum()


class FedKSeed(FederatedMethod):
    """FedKSeed on any engine; see the module docstring."""

    def __init__(self, config: FedKSeedConfig, blackbox: LocalBlackBox, clients: list[Encoded], test: Encoded) -> None:
        if not clients:
            raise ConfigError("FedKSeed needs at least one client")
        self.config, self.blackbox, self.clients, self.test = config, blackbox, clients, test
        self.num_clients = len(clients)
        warn_if_step_unresolved(config.eps, next(blackbox.model.parameters()).dtype, "eps")
        self.weights = PeftWeights(blackbox, config.peft_config(), seed=config.seed)
        self.initial = self.weights.to_arrays()
        self.coefficients = np.zeros(config.num_seeds, dtype=np.float32)
        # FedKSeed-Pro: each seed's scalar history, as sum |clip(s)| and length (one initial 0 each)
        self.abs_sums = np.zeros(config.num_seeds, dtype=np.float64)
        self.counts = np.ones(config.num_seeds, dtype=np.float64)
        self.train_queries = 0
        self._replayed: tuple[bytes, list[torch.Tensor]] | None = None

    def _load_global(self, coefficients: np.ndarray) -> None:
        key = hashlib.sha256(coefficients.tobytes()).digest()
        if self._replayed is None or self._replayed[0] != key:  # in-process clients share one replay per round
            self._replayed = key, replay(self.initial, coefficients, self.config.seed)
        self.weights.load_arrays({k: t.numpy() for k, t in zip(self.initial, self._replayed[1])})

    # ------------------------------------------------------------------ messages
    def downlink(self, round_: int) -> tuple[Arrays, dict]:
        arrays = {"coefficients": self.coefficients}
        if self.config.pro:
            arrays["seed_probabilities"] = seed_probabilities(self.abs_sums, self.counts).astype(np.float32)
        return arrays, {"round": round_}

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"scalars": (self.config.num_seeds,)}
        if self.config.pro:
            shapes.update(abs_clipped=(self.config.num_seeds,), counts=(self.config.num_seeds,))
        return shapes

    def client_update(self, client: int, round_: int, arrays: Arrays, header: dict, seed: int) -> tuple[Arrays, dict]:
        cfg = self.config
        coefficients = np.asarray(arrays["coefficients"], dtype=np.float32)
        self._load_global(coefficients)
        params, data = self.weights.params(), self.clients[client]
        rng = np.random.default_rng(seed)
        probs = None
        if cfg.pro:  # renormalised in float64: the wire carries float32
            probs = np.asarray(arrays["seed_probabilities"], dtype=np.float64)
            if probs.shape != (cfg.num_seeds,) or not np.isfinite(probs).all() or (probs < 0).any():
                raise ConfigError(f"seed_probabilities must be {cfg.num_seeds} finite values >= 0")
            probs = probs / probs.sum()
        accumulated = np.zeros(cfg.num_seeds, dtype=np.float64)
        abs_clipped, counts = np.zeros(cfg.num_seeds), np.zeros(cfg.num_seeds)
        before = self.blackbox.counter.stats.queries
        for _ in range(cfg.local_steps):
            k = int(rng.choice(cfg.num_seeds, p=probs))
            batch = sample_batch(data, cfg.batch_size, int(rng.integers(2**31)))
            s, _ = central_difference(lambda b=batch: self.weights.forward_loss(b), params, cfg.seed, k, cfg.eps)
            apply_seed_update(params, cfg.seed, k, s, cfg.lr)  # the local MeZO step
            accumulated[k] += s
            abs_clipped[k] += min(abs(s), cfg.pro_clip)
            counts[k] += 1
        header = {"n": len(data), "queries": self.blackbox.counter.stats.queries - before}
        update = {"scalars": accumulated.astype(np.float32)}
        if cfg.pro:
            update.update(abs_clipped=abs_clipped.astype(np.float32), counts=counts.astype(np.float32))
        return update, header

    # ------------------------------------------------------------------ server
    def header_spec(self, client: int) -> dict:
        """What an update header must hold (checked by the engine before :meth:`aggregate`)."""
        # two forward passes (a central difference) per local step
        return {"n": count(1, len(self.clients[client])), "queries": count(0, 2 * self.config.local_steps)}

    def aggregate(self, round_: int, updates: list[tuple[int, Arrays, dict]]) -> dict:
        if not updates:
            return {}
        total = sum(h["n"] for _, _, h in updates)
        mean = sum((h["n"] / total) * a["scalars"].astype(np.float64) for _, a, h in updates)
        self.coefficients = (self.coefficients + self.config.lr * mean).astype(np.float32)
        self.train_queries += sum(h["queries"] for _, _, h in updates)
        if self.config.pro:
            self._record_history(updates)
        return {"seeds_used": int(np.count_nonzero(self.coefficients))}

    def check_update(self, client: int, arrays: Arrays, header: dict) -> None:
        """FedKSeed-Pro's history arrays: whole step counts summing to the local steps, |s| clipped."""
        if not self.config.pro:
            return
        counts = arrays["counts"].astype(np.float64)
        abs_clipped = arrays["abs_clipped"].astype(np.float64)
        if (counts < 0).any() or (counts != np.rint(counts)).any() or counts.sum() != self.config.local_steps:
            raise InvalidUpdate(f"'counts' should be whole numbers >= 0 summing to {self.config.local_steps} steps")
        if (abs_clipped < 0).any() or (abs_clipped > counts * self.config.pro_clip * (1 + 1e-6)).any():
            raise InvalidUpdate(
                f"'abs_clipped' should be in [0, counts x pro_clip = {self.config.pro_clip:g}] per seed"
            )

    def _record_history(self, updates: list[tuple[int, Arrays, dict]]) -> None:
        """FedKSeed-Pro: append every client's scalars to the seeds' histories (as sums and counts)."""
        # each update passed check_update (finite by validate_update, whole counts, clipped sums)
        self.abs_sums += sum(a["abs_clipped"].astype(np.float64) for _, a, _ in updates)
        self.counts += sum(a["counts"].astype(np.float64) for _, a, _ in updates)

    def evaluate(self, round_: int) -> dict:
        self._load_global(self.coefficients)
        with torch.inference_mode():
            acc = float(accuracy(self.weights.scores(self.test)[None], self.test.labels.to(self.blackbox.device))[0])
        return {"test_accuracy": acc, "train_queries": self.train_queries, **peak_memory_mb()}

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> tuple[Arrays, dict]:
        arrays = {"coefficients": self.coefficients}
        if self.config.pro:
            arrays.update(abs_sums=self.abs_sums, counts=self.counts)
        return arrays, {"train_queries": self.train_queries}

    def load_state(self, arrays: Arrays, header: dict) -> None:
        self.coefficients = np.asarray(arrays["coefficients"], dtype=np.float32)
        if self.config.pro:
            self.abs_sums = np.asarray(arrays["abs_sums"], dtype=np.float64)
            self.counts = np.asarray(arrays["counts"], dtype=np.float64)
        self.train_queries = int(header["train_queries"])

    def global_weights(self) -> dict[str, np.ndarray]:
        """The current global PEFT weights (replayed from w0 and the coefficients)."""
        return {k: t.numpy() for k, t in zip(self.initial, replay(self.initial, self.coefficients, self.config.seed))}
