"""FedBPT: federated black-box prompt tuning.

Implementation based on Sun et al., "FedBPT: Efficient Federated Black-box Prompt Tuning for Large
Language Models", ICML 2024 (https://arxiv.org/abs/2310.01467), and the facts in DESIGN.md.

Per round, each sampled client starts a local CMA-ES from the global mean and step size (not the
covariance), runs ``local_iter`` generations of ``local_popsize`` candidates on its own data, and
uploads its final mean, that mean's fitness and its step size per generation. The server pools the
step sizes, sigma_g = sqrt(sum_c sum_t sigma_ct^2 / m / mu_local), and ``tell``s the m client means to
its own CMA-ES as one population in which all m are parents; the step-size change that update makes
rescales the clients' step size for the next round (no floor by default, as the official code in
effect; ``min_sigma`` > 0 sets one). With the fitness ratio (``perturb_rate``), each client draws a
fresh token-perturbed copy of its data every round from its own stream, as the official clients do.

Differences from the official code: the downlink is mean + sigma (~2 KB), not the pickled CMA-ES
object (~2 MB); every client has its own random stream; a round with fewer valid updates than m
(drop-outs, rejected or late updates) fills the empty parent slots with the current global mean,
ranked last, which shortens the step instead of failing. Beyond the paper, ``uplink='replay'`` sends
a client's seed and candidate ranks (~190 B) instead of its mean (:mod:`bbfl.methods.fedbpt.replay`).
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np

from bbfl.blackbox import Encoded, LocalBlackBox
from bbfl.federation.contract import Arrays, FederatedMethod
from bbfl.federation.headers import count, number, number_list, text
from bbfl.federation.privacy import add_noise, clip_to_norm, noise_std
from bbfl.methods.bbt import SubspaceProjection
from bbfl.methods.fedbpt.config import FedBPTConfig
from bbfl.methods.fedbpt.replay import ReplayError, local_search, parse_seed, replay_search
from bbfl.methods.losses import accuracy, get_loss
from bbfl.methods.robust import aggregate
from bbfl.optim import CMAES

log = logging.getLogger("bbfl.federation")
WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}
PERTURB_STREAM = 0x9E27  # key of the per-round perturbation draw within a client's stream


def through_wire(x: np.ndarray, wire_dtype: str) -> np.ndarray:
    """``x`` as a float32 array message in ``wire_dtype`` arrives (float64 again for the optimiser)."""
    return np.asarray(x).astype(np.float32).astype(WIRE_DTYPES[wire_dtype]).astype(np.float32).astype(np.float64)


class FedBPT(FederatedMethod):
    """Server state and client update of FedBPT over a soft-prompt black box."""

    def __init__(
        self,
        config: FedBPTConfig,
        blackbox: LocalBlackBox,
        clients: list[Encoded],
        test: Encoded,
        projection: SubspaceProjection,
        loss_name: str,
        clients_per_round: int,
        wire_dtype: str = "float32",
    ) -> None:
        self.config, self.blackbox, self.clients, self.test = config, blackbox, clients, test
        self.projection, self.loss_fn = projection, get_loss(loss_name, config.margin)
        self.num_clients = len(clients)
        self.m = max(1, min(clients_per_round, self.num_clients))
        self.wire_dtype = wire_dtype  # the replay uplink restarts clients from what the wire delivered
        self._reset()

    # ---------------------------------------------------------------- server state
    def _reset(self) -> None:
        d = self.config.intrinsic_dim
        # popsize >= 2 is pycma's minimum; with one client the second parent slot gets the old mean
        self.es = CMAES(
            np.zeros(d), self.config.sigma0, max(2, self.m), seed=self.config.seed, options={"CMA_mu": max(2, self.m)}
        )
        self.mean = np.zeros(d)
        self.sigma = self.config.sigma0  # what clients start from
        self.scale_sigma = self.config.sigma0  # the unfloored value the next rescaling multiplies
        self.rounds: list[dict] = []  # what aggregate() saw: replayed on resume
        self.train_queries = 0  # of the aggregated updates, as their clients report them
        self._client_queries = 0

    def downlink(self, round_: int) -> tuple[Arrays, dict]:
        arrays = {"mean": self.mean.astype(np.float32)}
        if self.config.downlink_covariance:
            arrays["covariance"] = self.es.covariance.astype(np.float32)
        return arrays, {"sigma": self.sigma, "round": round_}

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        return {} if self.config.uplink == "replay" else {"mean": (self.config.intrinsic_dim,)}

    def header_spec(self, client: int) -> dict:
        """What an update header must hold (checked by the engine before :meth:`aggregate`)."""
        cfg = self.config
        per_eval = 2 if cfg.perturb_rate > 0 else 1  # the perturbed copy doubles each evaluation
        common = {
            "fitness": number(),
            "examples": count(1, len(self.clients[client])),
            "queries": count(0, (cfg.local_iter * cfg.local_popsize + 1) * per_eval),
        }
        if cfg.uplink == "replay":  # the ranks' content is checked when the server replays them
            ranks = cfg.local_iter * cfg.local_popsize
            return {**common, "seed": count(0, 2**32 - 1), "ranks": text(ranks, ranks)}
        # pycma's CSA changes sigma by at most e per generation, from the sigma this round sent
        sigma_max = self.sigma * np.e**cfg.local_iter
        return {
            **common,
            "sigmas": number_list(cfg.local_iter, cfg.local_iter, high=sigma_max, positive=True),
            "local_mu": count(1, cfg.local_popsize),
        }

    def aggregate(self, round_: int, updates: list[tuple[int, Arrays, dict]]) -> dict:
        replay = {}
        if self.config.uplink == "replay":
            began = time.perf_counter()
            updates, rejected = self._replayed(round_, updates)
            replay = {"replay_seconds": time.perf_counter() - began, "replay_rejected": rejected}
            if not updates:
                return {"skipped": "no replayable update", **replay}
        solutions = np.stack([u["mean"].astype(np.float64) for _, u, _ in updates])
        fitnesses = np.array([h["fitness"] for _, _, h in updates], dtype=np.float64)
        sigma_sq = float(sum(np.sum(np.square(h["sigmas"])) for _, _, h in updates))
        local_mu = float(updates[0][2]["local_mu"])
        weights = np.array([h["examples"] for _, _, h in updates], dtype=np.float64)
        self.train_queries += sum(int(h.get("queries", 0)) for _, _, h in updates)
        step = {
            "solutions": solutions,
            "fitnesses": fitnesses,
            "sigma_sq": sigma_sq,
            "local_mu": local_mu,
            "weights": weights,
            "final_sigmas": [h["sigmas"][-1] for _, _, h in updates],
        }
        self._apply(step)
        self.rounds.append(step)
        return {"client_fitness_mean": float(fitnesses.mean()), **replay}

    def _replayed(self, round_: int, updates: list[tuple[int, Arrays, dict]]) -> tuple[list, list[dict]]:
        """Replay uplinks -> the dense updates the clients would have sent (mean as the wire carries it)."""
        cfg, (start, sigma, covariance) = self.config, self._as_received()
        dense, rejected = [], []
        for client, _, head in updates:
            try:
                if not np.isfinite(head.get("fitness", np.nan)):
                    raise ReplayError(f"'fitness' should be a finite number, got {head.get('fitness')!r}")
                seed = parse_seed(head.get("seed"))
                search = replay_search(
                    start, sigma, covariance, cfg.local_popsize, cfg.local_iter, seed, head.get("ranks")
                )
            except (ReplayError, TypeError) as exc:
                rejected.append({"client": client, "reason": str(exc)})
                log.warning("round %d: client %d replay uplink rejected: %s", round_, client, exc)
                continue
            mean = through_wire(self._clip(start, search.mean), self.wire_dtype)
            dense.append((client, {"mean": mean}, {**head, "sigmas": search.sigmas, "local_mu": search.mu}))
        return dense, rejected

    def _as_received(self) -> tuple[np.ndarray, float, np.ndarray | None]:
        # the downlink's (mean, sigma, covariance) after the wire: the state is unchanged until aggregation
        arrays, header = self.downlink(0)
        covariance = arrays.get("covariance")
        return (
            through_wire(arrays["mean"], self.wire_dtype),
            float(header["sigma"]),
            None if covariance is None else through_wire(covariance, self.wire_dtype),
        )

    def _apply(self, step: dict) -> None:
        if self.config.aggregation != "fedbpt":  # FedAvg or a robust rule on the client means
            rule = "mean" if self.config.aggregation == "fedavg" else self.config.aggregation
            cfg = self.config
            self.mean = aggregate(step["solutions"], step["weights"], rule, cfg.trim, cfg.num_malicious)
            if cfg.dp_clip is not None:  # replayed on resume with the same (seed, round) noise
                std = noise_std(cfg.dp_clip, cfg.dp_noise, step["weights"])
                self.mean = add_noise(self.mean, std, self.server_secret, len(self.rounds))
            sigmas = np.asarray(step["final_sigmas"], dtype=np.float64)
            self.sigma = float(np.sqrt(np.mean(np.square(sigmas))) if rule == "mean" else np.median(sigmas))
            return
        k = len(step["solutions"])
        # pooled local step sizes (the server CMA-ES sees m parents per "generation")
        self.es.sigma = np.sqrt(step["sigma_sq"] / k / step["local_mu"])
        sigma_before = self.es.sigma
        self.es.ask()
        solutions, fitnesses = step["solutions"], step["fitnesses"]
        missing = self.es.popsize - k
        if missing > 0:  # fill empty parent slots with the old mean, ranked worst
            solutions = np.vstack([solutions, np.repeat(self.mean[None], missing, 0)])
            fitnesses = np.concatenate([fitnesses, np.full(missing, fitnesses.max() + 1e-6)])
        with warnings.catch_warnings():
            # the client means are not this generation's own samples, which pycma flags as "injected"
            warnings.simplefilter("ignore")
            self.es.tell(solutions, fitnesses)
        self.scale_sigma = self.es.sigma / sigma_before * self.scale_sigma
        self.sigma = max(self.config.min_sigma, self.scale_sigma)
        self.mean = self.es.mean

    def state(self) -> tuple[Arrays, dict]:
        arrays, header = {}, {"rounds": [], "train_queries": self.train_queries}
        for i, step in enumerate(self.rounds):
            arrays[f"r{i}.solutions"] = step["solutions"]
            arrays[f"r{i}.fitnesses"] = step["fitnesses"]
            arrays[f"r{i}.weights"] = step["weights"]
            header["rounds"].append({k: step[k] for k in ("sigma_sq", "local_mu", "final_sigmas")})
        return arrays, header

    def load_state(self, arrays: Arrays, header: dict) -> None:
        """Rebuild the server CMA-ES by replaying every aggregation (exact: same seed, same inputs)."""
        self._reset()
        for i, scalars in enumerate(header["rounds"]):
            step = {**scalars, **{k: arrays[f"r{i}.{k}"] for k in ("solutions", "fitnesses", "weights")}}
            self._apply(step)
            self.rounds.append(step)
        self.train_queries = header["train_queries"]

    # ---------------------------------------------------------------- client
    def client_update(self, client: int, round_: int, arrays: Arrays, header: dict, seed: int):
        cfg = self.config
        start = arrays["mean"].astype(np.float64)
        noisy = self._perturbed_copy(client, seed)
        self._client_queries = 0

        def fitness(_generation: int, candidates: np.ndarray) -> np.ndarray:
            return self._fitness(client, candidates, noisy)

        covariance = arrays.get("covariance")
        search = local_search(
            start, float(header["sigma"]), covariance, cfg.local_popsize, cfg.local_iter, seed, fitness
        )
        final = self._clip(start, search.mean)
        common = {
            "fitness": float(self._fitness(client, final[None], noisy)[0]),
            "examples": len(self.clients[client]),
            "queries": self._client_queries,  # counted by the server on aggregation (on Flower too)
        }
        if cfg.uplink == "replay":  # the server re-runs the search from these
            return {}, {**common, "seed": int(seed), "ranks": search.ranks}
        return {"mean": final.astype(np.float32)}, {**common, "sigmas": search.sigmas, "local_mu": search.mu}

    def _clip(self, start: np.ndarray, final: np.ndarray) -> np.ndarray:
        # differential privacy: bound this client's influence on the average
        if self.config.dp_clip is None:
            return final
        return start + clip_to_norm(final - start, self.config.dp_clip)

    def _perturbed_copy(self, client: int, seed: int) -> Encoded | None:
        """This round's token-perturbed copy of the client's data (fresh each round, as the official clients)."""
        if self.config.perturb_rate <= 0:
            return None
        draw = int(np.random.SeedSequence([seed, PERTURB_STREAM]).generate_state(1)[0])
        return self.blackbox.perturbed(self.clients[client], self.config.perturb_rate, seed=draw)

    def _fitness(self, client: int, candidates: np.ndarray, noisy: Encoded | None) -> np.ndarray:
        prompts = self.projection(candidates)
        data = self.clients[client]
        self._client_queries += len(candidates) * (1 if noisy is None else 2)
        clean = self.loss_fn(self.blackbox.logits(prompts, data), data.labels)
        if noisy is not None:
            clean = clean / self.loss_fn(self.blackbox.logits(prompts, noisy), noisy.labels).clamp(min=1e-6)
        return clean.cpu().numpy().astype(np.float64)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, round_: int) -> dict:
        """Global prompt's test accuracy, and its loss on all clients' data (a simulation-only view)."""
        prompt = self.projection(self.mean)
        scores = self.blackbox.logits(prompt, self.test)
        train_losses = [self.loss_fn(self.blackbox.logits(prompt, c), c.labels)[0] * len(c) for c in self.clients]
        return {
            "test_accuracy": float(accuracy(scores, self.test.labels)[0]),
            "train_loss": float(sum(train_losses) / sum(len(c) for c in self.clients)),
            "train_queries": self.train_queries,
            "global_sigma": self.sigma,
        }
