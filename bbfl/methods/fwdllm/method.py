"""FwdLLM: federated tuning of PEFT weights by forward gradients only (Xu et al., USENIX ATC 2024).

Per round every sampled client takes a batch of its data, estimates the gradient of the loss w.r.t.
the PEFT weights from perturbed forward passes (no backward pass, no autograd graph) and sends the
estimate; the server averages the estimates (weighted by batch size) and takes an SGD step whose
learning rate decays linearly to 0 over the rounds.

* ``central``: g = sum_i s_i z_i / n with s_i = (L(w + h z_i) - L(w - h z_i)) / 2h, z_i ~ N(0, I) from
  the client's seed; perturbation and exact restore in place (:mod:`bbfl.optim.zeroth_order`).
* ``jvp``: s_i = dL/dw . z_i exactly, by forward-mode AD (``torch.func.jvp``) - still no backward pass.
* ``backprop``: the autograd gradient of the same loss - the baseline, in the same harness.
* client-local variance pacing (bbfl's rule, not the paper's): more directions on the same batch
  while the variance of the client's mean estimate on the probe tensor (the *last* tuned tensor) is
  above ``variance_threshold``; a variance needs two estimates, so pacing always takes at least two.
  FwdLLM's own pacing is decided by the server from all clients' gradients; it is not implemented here.
* discriminative sampling: of ``candidates`` random directions keep the one most aligned with the
  previous global gradient (sent down only when this is on).
* ``uplink="seed"``: only the scalars s_i travel up; the server regenerates each z_i from the
  client's seed and the direction ids, so the upload is a few floats whatever the PEFT size.
"""

from __future__ import annotations

import numpy as np
import torch

from bbfl.blackbox import Encoded, LocalBlackBox
from bbfl.exceptions import ConfigError
from bbfl.federation.contract import Arrays, FederatedMethod
from bbfl.federation.headers import count, int_list
from bbfl.federation.privacy import add_noise, noise_std
from bbfl.memory import peak_memory_mb
from bbfl.methods.fwdllm.config import FwdLLMConfig
from bbfl.methods.losses import accuracy
from bbfl.optim.zeroth_order import Perturbation, direction, jvp_gradient, warn_if_step_unresolved
from bbfl.peft import PeftWeights

GRAD = "grad/"  # dense uplink keys: grad/<tensor name>
PREV = "prev/"  # discriminative sampling: the previous global gradient, sent down


def sample_batch(data: Encoded, batch_size: int, seed: int) -> Encoded:
    """A client's batch for this round: ``batch_size`` of its examples (all if it has fewer), seeded."""
    if len(data) <= batch_size:
        return data
    picked = np.random.default_rng(seed).choice(len(data), batch_size, replace=False)
    return data.subset(torch.from_numpy(np.sort(picked)))


def probe_variance(estimates: list[torch.Tensor]) -> float:
    """Per-element variance of the mean of ``estimates`` (each one direction's s_i z_i on the probe tensor).

    Needs at least two estimates (a sample variance of one is undefined).
    """
    if len(estimates) < 2:
        raise ConfigError(f"the variance of a mean needs >= 2 estimates, got {len(estimates)}")
    stacked = torch.stack(estimates)
    return float(stacked.var(0, unbiased=True).mean() / len(estimates))


class FwdLLM(FederatedMethod):
    """FwdLLM on any engine: see the module docstring. ``clients``: each client's encoded training data."""

    def __init__(
        self,
        config: FwdLLMConfig,
        blackbox: LocalBlackBox,
        clients: list[Encoded],
        test: Encoded,
        rounds: int,
    ) -> None:
        if not clients:
            raise ConfigError("FwdLLM needs at least one client")
        self.config, self.blackbox, self.clients, self.test, self.rounds = config, blackbox, clients, test, rounds
        self.num_clients = len(clients)
        if config.estimator == "central":
            warn_if_step_unresolved(config.h, next(blackbox.model.parameters()).dtype, "h")
        self.weights = PeftWeights(blackbox, config.peft_config(), seed=config.seed)
        self.names = list(self.weights.tensors)
        self.global_weights = self.weights.to_arrays()  # the server's copy; the model holds a working copy
        self.prev_grad: Arrays | None = None
        self.train_queries = 0
        if config.estimator == "jvp":
            _use_eager_attention(blackbox)

    # ------------------------------------------------------------------ messages
    def downlink(self, round_: int) -> tuple[Arrays, dict]:
        arrays = dict(self.global_weights)
        if self.config.candidates > 1 and self.prev_grad is not None:
            arrays.update({PREV + k: v for k, v in self.prev_grad.items()})
        return arrays, {"round": round_}

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.config.uplink == "seed":
            return {"scalars": (self.config.max_perturbations,)}
        return {GRAD + k: v.shape for k, v in self.global_weights.items()}

    # ------------------------------------------------------------------ client
    def client_update(self, client: int, round_: int, arrays: Arrays, header: dict, seed: int) -> tuple[Arrays, dict]:
        cfg = self.config
        self.weights.load_arrays({k: arrays[k] for k in self.names})
        prev = [torch.from_numpy(arrays[PREV + k]) for k in self.names] if PREV + self.names[0] in arrays else None
        batch = sample_batch(self.clients[client], cfg.batch_size, seed)
        before = self.blackbox.counter.stats.queries
        if cfg.estimator == "backprop":
            grad, steps, scalars = self._backprop_gradient(batch), [], []
        else:
            grad, steps, scalars = self._forward_gradient(batch, seed, prev)
        queries = self.blackbox.counter.stats.queries - before
        if cfg.dp_clip is not None:  # bound this client's influence; the estimate is linear in the scalars
            norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grad)))
            factor = min(1.0, cfg.dp_clip / norm) if norm > 0 else 1.0
            grad, scalars = [g * factor for g in grad], [s * factor for s in scalars]
        out_header = {"n": len(batch), "queries": queries, "seed": seed, "steps": steps}
        if cfg.uplink == "seed":
            padded = np.zeros(cfg.max_perturbations, dtype=np.float32)
            padded[: len(scalars)] = scalars
            return {"scalars": padded}, out_header
        return {GRAD + k: g.numpy().astype(np.float32) for k, g in zip(self.names, grad)}, out_header

    def _forward_gradient(self, batch: Encoded, seed: int, prev: list[torch.Tensor] | None):
        """Directions until pacing is satisfied; returns (mean estimate, direction ids, scalars)."""
        cfg = self.config
        params = self.weights.params()
        total = [torch.zeros_like(p, device="cpu") for p in params]
        steps, scalars, probes = [], [], []
        next_id = 0
        while len(steps) < cfg.max_perturbations:
            step, next_id = self._pick_direction(params, seed, next_id, prev)
            s, z = self._directional_derivative(batch, params, seed, step)
            s = float(np.float32(s))  # the scalar as the seed uplink carries it: both uplinks give the same sums
            steps.append(step)
            scalars.append(s)
            total = [t + s * d for t, d in zip(total, z)]
            probes.append((s * z[-1]).flatten())  # probe: the last tuned tensor, nearest the output
            if len(steps) >= self._min_directions() and (
                cfg.variance_threshold is None or probe_variance(probes) <= cfg.variance_threshold
            ):
                break
        return [t / len(steps) for t in total], steps, scalars

    def _min_directions(self) -> int:
        # pacing reads a variance, which needs two estimates
        return (
            self.config.perturbations if self.config.variance_threshold is None else max(2, self.config.perturbations)
        )

    def _pick_direction(self, params, seed: int, next_id: int, prev) -> tuple[int, int]:
        """FwdLLM's discriminative sampling: of ``candidates`` direction ids keep the best aligned one."""
        if self.config.candidates == 1 or prev is None:
            return next_id, next_id + 1
        flat_prev = torch.cat([p.flatten() for p in prev])
        ids = range(next_id, next_id + self.config.candidates)
        cosines = [
            float(torch.nn.functional.cosine_similarity(torch.cat([d.flatten() for d in z]), flat_prev, dim=0))
            for z in (direction([p.shape for p in params], seed, i) for i in ids)
        ]
        return ids[int(np.argmax(cosines))], next_id + self.config.candidates

    def _directional_derivative(self, batch: Encoded, params, seed: int, step: int):
        if self.config.estimator == "jvp":
            return self._jvp(batch, params, seed, step)
        z = direction([p.shape for p in params], seed, step)
        pert = Perturbation(params)
        try:
            pert.apply(z, self.config.h)
            plus = self.weights.forward_loss(batch)
            pert.apply(z, -self.config.h)
            minus = self.weights.forward_loss(batch)
        finally:
            pert.restore()
        return (plus - minus) / (2 * self.config.h), z

    def _jvp(self, batch: Encoded, params, seed: int, step: int):
        def loss_of(tensors):
            with self.weights.swapped(list(tensors)):
                return self.weights.loss(batch)

        counter = self.blackbox.counter
        with counter.charge(queries=1, examples=len(batch), tokens=batch.n_tokens), torch.no_grad():
            try:
                return jvp_gradient(loss_of, params, seed, step)
            except (NotImplementedError, RuntimeError) as exc:
                raise ConfigError(
                    f"--estimator jvp is not supported by this model's operations ({exc}); use --estimator central"
                ) from exc

    def _backprop_gradient(self, batch: Encoded) -> list[torch.Tensor]:
        leaves = [p.detach().clone().requires_grad_(True) for p in self.weights.params()]
        counter = self.blackbox.counter
        with counter.charge(queries=1, examples=len(batch), tokens=batch.n_tokens), self.weights.swapped(leaves):
            grads = torch.autograd.grad(self.weights.loss(batch), leaves)
        return [g.detach().cpu() for g in grads]

    # ------------------------------------------------------------------ server
    def header_spec(self, client: int) -> dict:
        """What an update header must hold (checked by the engine before :meth:`aggregate`)."""
        cfg = self.config
        fewest = 1 if cfg.uplink == "seed" else 0  # backprop's dense update lists no directions
        return {
            "n": count(1, min(cfg.batch_size, len(self.clients[client]))),
            "queries": count(0, 2 * cfg.max_perturbations),  # two forward passes per direction at most
            "seed": count(0, 2**32 - 1),
            "steps": int_list(fewest, cfg.max_perturbations, 0, cfg.max_perturbations * cfg.candidates - 1),
        }

    def aggregate(self, round_: int, updates: list[tuple[int, Arrays, dict]]) -> dict:
        if not updates:
            return {"lr": 0.0}
        total_n = sum(h["n"] for _, _, h in updates)
        mean = {k: np.zeros_like(v) for k, v in self.global_weights.items()}
        for _, arrays, header in updates:
            for k, g in zip(self.names, self._client_gradient(arrays, header)):
                mean[k] += (header["n"] / total_n) * g
        if self.config.dp_clip is not None:
            std = noise_std(self.config.dp_clip, self.config.dp_noise, [h["n"] for _, _, h in updates])
            mean = {
                k: add_noise(v, std, self.server_secret, round_ * 4096 + i) for i, (k, v) in enumerate(mean.items())
            }
        lr = self.config.lr * (1.0 - (round_ - 1) / self.rounds)  # linear decay to 0 over the run
        self.global_weights = {k: (w - lr * mean[k]).astype(np.float32) for k, w in self.global_weights.items()}
        self.prev_grad = {k: v.astype(np.float32) for k, v in mean.items()}
        self.train_queries += sum(h["queries"] for _, _, h in updates)
        grad_norm = float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in mean.values())))
        return {
            "lr": lr,
            "grad_norm": grad_norm,
            "perturbations_mean": float(np.mean([len(h["steps"]) for _, _, h in updates])),
        }

    def _client_gradient(self, arrays: Arrays, header: dict) -> list[np.ndarray]:
        if self.config.uplink == "dense":
            return [arrays[GRAD + k] for k in self.names]
        steps = header["steps"]
        if not isinstance(steps, list) or not 1 <= len(steps) <= self.config.max_perturbations:
            raise ConfigError(f"seed update lists {steps!r} directions; expected 1..{self.config.max_perturbations}")
        shapes = [v.shape for v in self.global_weights.values()]
        total = [np.zeros(s, dtype=np.float32) for s in shapes]
        for s, step in zip(arrays["scalars"][: len(steps)], steps):
            total = [t + float(s) * d.numpy() for t, d in zip(total, direction(shapes, int(header["seed"]), int(step)))]
        return [t / len(steps) for t in total]

    def evaluate(self, round_: int) -> dict:
        self.weights.load_arrays(self.global_weights)
        with torch.inference_mode():
            acc = float(accuracy(self.weights.scores(self.test)[None], self.test.labels.to(self.blackbox.device))[0])
        return {"test_accuracy": acc, "train_queries": self.train_queries, **peak_memory_mb()}

    # ------------------------------------------------------------------ checkpoint
    def state(self) -> tuple[Arrays, dict]:
        arrays = {"w/" + k: v for k, v in self.global_weights.items()}
        if self.prev_grad is not None:
            arrays.update({PREV + k: v for k, v in self.prev_grad.items()})
        return arrays, {"train_queries": self.train_queries}

    def load_state(self, arrays: Arrays, header: dict) -> None:
        self.global_weights = {k: arrays["w/" + k] for k in self.names}
        self.prev_grad = {k: arrays[PREV + k] for k in self.names} if PREV + self.names[0] in arrays else None
        self.train_queries = int(header["train_queries"])


def _use_eager_attention(blackbox: LocalBlackBox) -> None:
    # fused SDPA kernels have no forward-mode derivative in torch; eager attention does
    if hasattr(blackbox.model, "set_attn_implementation"):
        try:
            blackbox.model.set_attn_implementation("eager")
        except (ValueError, NotImplementedError):
            pass  # the model keeps its attention; jvp may then fail with a clear error
