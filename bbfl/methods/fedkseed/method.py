"""FedKSeed: federated zeroth-order tuning where every update is (seed, scalar) pairs from K seeds.

Qin et al., ICML 2024. The server and every client share ``num_seeds`` direction seeds and the
initial PEFT weights w0 (both from the config's seed, so nothing but K numbers ever travels):

* a client rebuilds the global weights w = w0 - sum_k c_k z_k by *replay* from the K global
  coefficients c (the download: K floats, whatever the model size or the number of rounds);
* it runs ``local_steps`` MeZO steps, each picking a seed k (uniformly, or by FedKSeed-Pro's
  importance), s = (L(w + eps z_k) - L(w - eps z_k)) / 2 eps on a batch, w -= lr s z_k, and adds s
  into its k-th accumulator (the upload: K floats);
* the server averages the accumulators (weighted by client data size) and sets c += lr * mean.

Replay is bit-for-bit reproducible on any machine: z_k comes from the counter-based generator in
:mod:`bbfl.optim.zeroth_order` and the coefficients are applied in a fixed order in fp32.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from bbfl.blackbox import Encoded, LocalBlackBox
from bbfl.exceptions import ConfigError
from bbfl.federation.headers import count
from bbfl.memory import peak_memory_mb
from bbfl.methods.base import Arrays, FederatedMethod
from bbfl.methods.fedkseed.config import FedKSeedConfig
from bbfl.methods.fwdllm.method import sample_batch
from bbfl.methods.losses import accuracy
from bbfl.optim.zeroth_order import apply_seed_update, central_difference
from bbfl.peft import PeftWeights


def replay(initial: dict[str, np.ndarray], coefficients: np.ndarray, pool_seed: int) -> list[torch.Tensor]:
    """w0 - sum_k c_k z_k, applied seed by seed in increasing k, in fp32 (identical on every machine)."""
    params = [torch.from_numpy(np.array(v, dtype=np.float32)) for v in initial.values()]
    for k in np.flatnonzero(coefficients):
        apply_seed_update(params, pool_seed, int(k), float(coefficients[k]), lr=1.0)
    return params


def seed_probabilities(coefficients: np.ndarray, pro: bool) -> np.ndarray | None:
    """FedKSeed-Pro: P(k) grows with |c_k| (smoothed by the mean so unused seeds stay possible); else uniform."""
    magnitude = np.abs(coefficients.astype(np.float64))
    if not pro or magnitude.sum() == 0:
        return None
    weights = magnitude + magnitude.mean()
    return weights / weights.sum()


class FedKSeed(FederatedMethod):
    """FedKSeed on any engine; see the module docstring."""

    def __init__(self, config: FedKSeedConfig, blackbox: LocalBlackBox, clients: list[Encoded], test: Encoded) -> None:
        if not clients:
            raise ConfigError("FedKSeed needs at least one client")
        self.config, self.blackbox, self.clients, self.test = config, blackbox, clients, test
        self.num_clients = len(clients)
        self.weights = PeftWeights(blackbox, config.peft_config(), seed=config.seed)
        self.initial = self.weights.to_arrays()
        self.coefficients = np.zeros(config.num_seeds, dtype=np.float32)
        self.train_queries = 0
        self._replayed: tuple[bytes, list[torch.Tensor]] | None = None

    def _load_global(self, coefficients: np.ndarray) -> None:
        key = hashlib.sha256(coefficients.tobytes()).digest()
        if self._replayed is None or self._replayed[0] != key:  # in-process clients share one replay per round
            self._replayed = key, replay(self.initial, coefficients, self.config.seed)
        self.weights.load_arrays({k: t.numpy() for k, t in zip(self.initial, self._replayed[1])})

    # ------------------------------------------------------------------ messages
    def downlink(self, round_: int) -> tuple[Arrays, dict]:
        return {"coefficients": self.coefficients}, {"round": round_}

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"scalars": (self.config.num_seeds,)}

    def client_update(self, client: int, round_: int, arrays: Arrays, header: dict, seed: int) -> tuple[Arrays, dict]:
        cfg = self.config
        coefficients = np.asarray(arrays["coefficients"], dtype=np.float32)
        self._load_global(coefficients)
        params, data = self.weights.params(), self.clients[client]
        rng = np.random.default_rng(seed)
        probs = seed_probabilities(coefficients, cfg.pro)
        accumulated = np.zeros(cfg.num_seeds, dtype=np.float64)
        before = self.blackbox.counter.stats.queries
        for _ in range(cfg.local_steps):
            k = int(rng.choice(cfg.num_seeds, p=probs))
            batch = sample_batch(data, cfg.batch_size, int(rng.integers(2**31)))
            s, _ = central_difference(lambda b=batch: self.weights.forward_loss(b), params, cfg.seed, k, cfg.eps)
            apply_seed_update(params, cfg.seed, k, s, cfg.lr)  # the local MeZO step
            accumulated[k] += s
        header = {"n": len(data), "queries": self.blackbox.counter.stats.queries - before}
        return {"scalars": accumulated.astype(np.float32)}, header

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
        return {"seeds_used": int(np.count_nonzero(self.coefficients))}

    def evaluate(self, round_: int) -> dict:
        self._load_global(self.coefficients)
        with torch.inference_mode():
            acc = float(accuracy(self.weights.scores(self.test)[None], self.test.labels.to(self.blackbox.device))[0])
        return {"test_accuracy": acc, "train_queries": self.train_queries, **peak_memory_mb()}

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> tuple[Arrays, dict]:
        return {"coefficients": self.coefficients}, {"train_queries": self.train_queries}

    def load_state(self, arrays: Arrays, header: dict) -> None:
        self.coefficients = np.asarray(arrays["coefficients"], dtype=np.float32)
        self.train_queries = int(header["train_queries"])

    def global_weights(self) -> dict[str, np.ndarray]:
        """The current global PEFT weights (replayed from w0 and the coefficients)."""
        return {k: t.numpy() for k, t in zip(self.initial, replay(self.initial, self.coefficients, self.config.seed))}
