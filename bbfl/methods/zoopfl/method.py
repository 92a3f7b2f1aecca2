"""ZooPFL: personalised FL through input surgery and semantic re-mapping around a black-box model.

Implementation based on the description of Lu et al., "ZooPFL: Exploring Black-box Foundation Models
for Personalized Federated Learning" (arXiv 2310.05143), which has no public code. Our choices:

* **Input surgery** = a shared encoder E (features -> latent u in [-1, 1]^r) + a private client
  embedding e_c (k numbers), decoded by a *fixed random* linear map D (BBT's scaling, rebuilt from the
  seed, never trained or sent) into a per-example soft prefix p0 + D [u, e_c] of L tokens. The fixed
  decoder is ZO-AE-DS's "decoder as part of the black box": zeroth-order estimates are taken in the
  (r + k)-dimensional code space, then chained into E and e_c by ordinary local backprop.
* **Features** of an example = the mean of its tokens' input word embeddings (the embedding access a
  soft-prompt black box already grants), scaled by the embedding std.
* **Reconstruction pre-training**: in its first round a client trains E with a reconstruction head R
  (latent -> features, MSE); R is shared and averaged like E.
* **Semantic re-mapping** = a private linear layer on the black box's class scores (identity at the
  start), trained locally by ordinary gradients on the returned scores.
* **What moves**: only E and R (28.7k floats with MiniLM, H = 384: 115 KB in fp32). e_c and the
  re-mapping layer never leave the client. With ``federate=False`` E and R stay local too (the
  local-only baseline); with ``surgery=False`` (re-mapping only) nothing is sent at all.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bbfl.blackbox import Encoded, LocalBlackBox
from bbfl.federation.contract import Arrays, ClientClock, FederatedMethod
from bbfl.federation.headers import count, number
from bbfl.methods.zoopfl.config import ZooPFLConfig


class SurgeryEncoder(nn.Module):
    """The shared part of the input surgery: features [B, F] -> latent [B, r], plus its reconstruction head."""

    def __init__(self, in_dim: int, hidden_dim: int, latent_dim: int) -> None:
        super().__init__()
        self.encode = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, latent_dim), nn.Tanh()
        )
        self.reconstruct = nn.Linear(latent_dim, in_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.encode(features)


def new_encoder(in_dim: int, config: ZooPFLConfig, seed: int) -> SurgeryEncoder:
    """A :class:`SurgeryEncoder` initialised from ``seed`` on a forked RNG: the global torch RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # nn.Linear draws its init from the global RNG; the fork keeps it private
        return SurgeryEncoder(in_dim, config.hidden_dim, config.latent_dim)


def example_features(blackbox: LocalBlackBox, data: Encoded) -> torch.Tensor:
    """[B, H] mean input word embedding of each example's ordinary tokens (original order), / embedding std.

    A black box with its own ``example_features`` (a served model: its client cannot read the embedding
    table) computes them itself, with this function on the server's side.
    """
    own = getattr(blackbox, "example_features", None)
    if own is not None:
        return own(data)
    special = torch.tensor(sorted(set(blackbox.tokenizer.all_special_ids)))
    table = blackbox.word_embeddings.weight.detach().float().cpu()
    feats = torch.stack([table[ids.cpu()[~torch.isin(ids.cpu(), special)]].mean(0) for ids in data.input_ids])
    out = torch.empty_like(feats)
    out[data.order.cpu()] = feats  # data.input_ids are in length order
    return torch.nan_to_num(out / blackbox.embedding_std)  # an example of only special tokens -> zeros


def fixed_decoder(config: ZooPFLConfig, blackbox: LocalBlackBox) -> torch.Tensor:
    """[L * H, D] the surgery's fixed random decoder (BBT's projection scaling), rebuilt from the seed."""
    generator = torch.Generator().manual_seed(config.seed)
    std = config.alpha * blackbox.embedding_std / math.sqrt(config.code_dim)
    n_out = config.prompt_length * blackbox.hidden_size
    return torch.randn(n_out, config.code_dim, generator=generator) * std


def decode_prefixes(codes: torch.Tensor, decoder: torch.Tensor, p0: torch.Tensor) -> torch.Tensor:
    """[..., D] codes -> [..., L, H] soft prefixes p0 + D code."""
    return (codes @ decoder.T).unflatten(-1, p0.shape) + p0


class ZooPFL(FederatedMethod):
    """Server state (shared surgery weights) and client update of ZooPFL over a soft-prompt black box."""

    def __init__(
        self,
        config: ZooPFLConfig,
        blackbox: LocalBlackBox,
        clients: list[Encoded],
        client_tests: list[Encoded],
        test: Encoded,
        num_classes: int,
    ) -> None:
        self.config, self.blackbox, self.clients, self.client_tests, self.test = (
            config,
            blackbox,
            clients,
            client_tests,
            test,
        )
        self.num_clients, self.num_classes = len(clients), num_classes
        self.features = [example_features(blackbox, c) for c in clients]
        self.test_features = [example_features(blackbox, c) for c in client_tests]
        self.global_test_features = example_features(blackbox, test)
        self.p0 = blackbox.token_embeddings(".", config.prompt_length).cpu()
        self.decoder = fixed_decoder(config, blackbox)  # fixed, never sent
        # the initial shared weights: the same on every run with this seed, drawn without touching the
        # caller's global RNG
        self.encoder = new_encoder(blackbox.hidden_size, config, seed=config.seed)
        self.client_states: dict[int, Arrays] = {}
        self.train_queries = 0  # of the aggregated updates, as their clients report them
        self._client_queries = 0
        # wall-clock of the client updates (this process, since start or resume): in total, inside the
        # black box's calls, and fitting the re-mapping; the rest is the surgery's local work
        self.clock = ClientClock(self, blackbox)
        self.remap_seconds = 0.0

    # ---------------------------------------------------------------- shared weights <-> arrays
    def _shared_arrays(self, module: SurgeryEncoder) -> Arrays:
        return {name: p.detach().numpy().astype(np.float32).copy() for name, p in module.state_dict().items()}

    def _module_from(self, arrays: Arrays) -> SurgeryEncoder:
        module = new_encoder(self.blackbox.hidden_size, self.config, seed=0)  # its weights are overwritten
        module.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})
        return module

    @property
    def _shares_surgery(self) -> bool:
        # nothing shared is trained without surgery, and nothing is shared without federation
        return self.config.federate and self.config.surgery

    def update_shapes(self) -> dict[str, tuple[int, ...]]:
        if not self._shares_surgery:
            return {}
        return {name: tuple(p.shape) for name, p in self.encoder.state_dict().items()}

    def downlink(self, round_: int) -> tuple[Arrays, dict]:
        if not self._shares_surgery:  # local-only or re-mapping only: nothing to send
            return {}, {"round": round_}
        return self._shared_arrays(self.encoder), {"round": round_}

    # ---------------------------------------------------------------- client
    def _client_state(self, client: int) -> Arrays:
        if client not in self.client_states:
            c, k = self.num_classes, self.config.client_embed_dim
            self.client_states[client] = {
                "embedding": np.zeros(k, np.float32),
                "remap_weight": np.eye(c, dtype=np.float32),
                "remap_bias": np.zeros(c, np.float32),
                "pretrained": np.zeros(1, np.float32),
            }
        return self.client_states[client]

    def client_update(self, client: int, round_: int, arrays: Arrays, header: dict, seed: int):
        cfg, state = self.config, self._client_state(client)
        self._client_queries = 0
        personal = {k[4:]: v for k, v in state.items() if k.startswith("enc.")}
        encoder = self._module_from(arrays if self._shares_surgery else (personal or self._shared_arrays(self.encoder)))
        embedding = torch.tensor(state["embedding"], requires_grad=True)
        remap_w = torch.tensor(state["remap_weight"], requires_grad=True)
        remap_b = torch.tensor(state["remap_bias"], requires_grad=True)
        feats, data = self.features[client], self.clients[client]
        generator = torch.Generator().manual_seed(seed)
        if cfg.surgery and cfg.pretrain_steps and not state["pretrained"][0]:
            _pretrain_autoencoder(encoder, feats, cfg.pretrain_steps)
            state["pretrained"][:] = 1
        opt = torch.optim.Adam([*encoder.parameters(), embedding], lr=cfg.lr)
        opt_remap = torch.optim.Adam([remap_w, remap_b], lr=cfg.remap_lr)
        losses, fixed_scores = [], None
        for _ in range(cfg.local_steps):
            if cfg.surgery:
                scores, loss = self._zeroth_order_step(encoder, embedding, remap_w, remap_b, feats, data, generator)
                opt.step()
            else:  # re-mapping only: the black box's scores never change, ask once
                if fixed_scores is None:
                    fixed_scores = self._scores(encoder, embedding, feats, data)
                    self._client_queries += 1
                scores = fixed_scores
                loss = F.cross_entropy(scores @ remap_w.detach().T + remap_b.detach(), data.labels.cpu()).item()
            losses.append(loss)
            if cfg.remap:
                began = time.perf_counter()
                _fit_remap(remap_w, remap_b, opt_remap, scores, data.labels.cpu(), cfg.remap_steps)
                self.remap_seconds += time.perf_counter() - began
        state["embedding"] = embedding.detach().numpy().copy()
        state["remap_weight"] = remap_w.detach().numpy().copy()
        state["remap_bias"] = remap_b.detach().numpy().copy()
        shared = self._shared_arrays(encoder)
        if not self._shares_surgery:
            if cfg.surgery:  # local-only: the client's own surgery is private state
                state.update({f"enc.{k}": v for k, v in shared.items()})
            shared = {}
        header = {"examples": len(data), "train_loss": float(np.mean(losses)), "queries": self._client_queries}
        return shared, header  # the server counts the queries on aggregation (on Flower too)

    def _zeroth_order_step(self, encoder, embedding, remap_w, remap_b, feats, data, generator):
        """One ZO step: probe the black box around each example's code, backprop the estimate into E and e_c."""
        cfg = self.config
        code = torch.cat([encoder(feats), embedding.expand(len(feats), -1)], 1)  # [B, D], in the graph
        if cfg.estimator == "coordinate":
            directions = torch.eye(cfg.code_dim)
        else:
            directions = torch.randn(cfg.zo_queries, cfg.code_dim, generator=generator)
        seen = {}

        def loss_at(codes: torch.Tensor) -> torch.Tensor:
            scores = self.blackbox.paired_logits(self._prefixes(codes), data).cpu().clone()  # [K, B, C]
            self._client_queries += len(codes)
            seen["scores"] = scores[0]
            return _per_example_ce(scores @ remap_w.detach().T + remap_b.detach(), data.labels.cpu())

        grad_code, base_loss = zo_code_gradient(loss_at, code.detach(), directions, cfg.zo_mu, cfg.estimator)
        encoder.zero_grad()
        embedding.grad = None
        code.backward(grad_code / len(feats))  # chain rule into the white-box encoder and the embedding
        return seen["scores"], float(base_loss.mean())

    def _prefixes(self, codes: torch.Tensor) -> torch.Tensor:
        return decode_prefixes(codes, self.decoder, self.p0)

    def _scores(self, encoder, embedding, feats, data) -> torch.Tensor:
        with torch.no_grad():
            code = torch.cat([encoder(feats), embedding.expand(len(feats), -1)], 1)
            return self.blackbox.paired_logits(self._prefixes(code)[None], data)[0].cpu().clone()

    # ---------------------------------------------------------------- server
    def header_spec(self, client: int) -> dict:
        """What an update header must hold (checked by the engine before :meth:`aggregate`)."""
        cfg = self.config
        probes = cfg.local_steps * (max(cfg.zo_queries, cfg.code_dim) + 1)  # one batched call per ZO step
        examples = len(self.clients[client])
        return {"examples": count(1, examples), "train_loss": number(0.0), "queries": count(0, probes)}

    def aggregate(self, round_: int, updates: list[tuple[int, Arrays, dict]]) -> dict:
        losses = [h["train_loss"] for _, _, h in updates]
        self.train_queries += sum(int(h.get("queries", 0)) for _, _, h in updates)
        if self._shares_surgery:
            weights = np.array([h["examples"] for _, _, h in updates], dtype=np.float64)
            weights /= weights.sum()
            mean = {
                k: sum(w * u[k].astype(np.float64) for w, (_, u, _) in zip(weights, updates)) for k in updates[0][1]
            }
            self.encoder = self._module_from(mean)
        return {"client_train_loss": float(np.mean(losses))}

    def evaluate(self, round_: int) -> dict:
        """Global accuracy (shared surgery, neutral embedding, no re-mapping) and personalised accuracy.

        Also the clients' wall-clock so far (updates run in this process, since start or resume):
        ``client_seconds``, of which ``client_blackbox_seconds`` inside the black box's calls and
        ``client_remap_seconds`` fitting the re-mapping; the rest is the surgery's local work.
        """
        zeros = torch.zeros(self.config.client_embed_dim)
        scores = self._scores(self.encoder, zeros, self.global_test_features, self.test)
        out = {"test_accuracy": _accuracy(scores, self.test.labels), "train_queries": self.train_queries}
        per_client = [
            (self._personal_accuracy(c, data, feats), len(data))
            for c, (data, feats) in enumerate(zip(self.client_tests, self.test_features))
            if len(data)
        ]
        out.update(personal_summary(per_client))
        out.update(
            client_seconds=self.clock.seconds,
            client_blackbox_seconds=self.clock.blackbox_seconds,
            client_remap_seconds=self.remap_seconds,
        )
        return out

    def _personal_accuracy(self, client: int, data: Encoded, feats: torch.Tensor) -> float:
        state = self._client_state(client)
        personal = {k[4:]: v for k, v in state.items() if k.startswith("enc.")}
        encoder = self._module_from(personal) if personal else self.encoder
        scores = self._scores(encoder, torch.from_numpy(state["embedding"]), feats, data)
        mapped = scores @ torch.from_numpy(state["remap_weight"]).T + torch.from_numpy(state["remap_bias"])
        return _accuracy(mapped, data.labels)

    def state(self) -> tuple[Arrays, dict]:
        return self._shared_arrays(self.encoder), {"train_queries": self.train_queries}

    def load_state(self, arrays: Arrays, header: dict) -> None:
        self.encoder = self._module_from(arrays)
        self.train_queries = header["train_queries"]

    def client_state(self, client: int) -> Arrays | None:
        return self.client_states.get(client)

    def load_client_state(self, client: int, arrays: Arrays) -> None:
        self.client_states[client] = {k: np.array(v, dtype=np.float32) for k, v in arrays.items()}


def zo_code_gradient(
    loss_at, code: torch.Tensor, directions: torch.Tensor, mu: float, estimator: str = "random"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroth-order estimate of d loss_b / d code_b for every example b, from one batched black-box call.

    ``loss_at`` maps codes [K, B, D] to per-example losses [K, B]; it is called once with the code and
    the K - 1 probes code + mu * direction. ``random``: Gaussian directions [q, D], estimate
    (1/q) sum_j (l(c + mu v_j) - l(c)) / mu * v_j (unbiased for the mu-smoothed loss); ``coordinate``:
    directions = the identity, one forward difference per coordinate. Returns (gradient [B, D], loss [B]).
    """
    with torch.no_grad():
        probes = torch.cat([code[None], code[None] + mu * directions[:, None]])  # [K, B, D]
        losses = loss_at(probes)
        slopes = (losses[1:] - losses[0]) / mu  # [q, B] directional derivatives
        scale = 1.0 if estimator == "coordinate" else 1.0 / len(directions)
        return slopes.T @ directions * scale, losses[0]


def _per_example_ce(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[K, B, C] scores -> [K, B] cross-entropy of each example."""
    flat = F.cross_entropy(scores.flatten(0, 1), labels.repeat(scores.shape[0]), reduction="none")
    return flat.view(scores.shape[0], -1)


def _pretrain_autoencoder(encoder: SurgeryEncoder, feats: torch.Tensor, steps: int) -> None:
    """Reconstruction pre-training: features -> latent -> features (MSE), local data only."""
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(encoder.reconstruct(encoder(feats)), feats).backward()
        opt.step()


def personal_summary(per_client: list[tuple[float, int]]) -> dict:
    """ZooPFL's personalised metrics from (accuracy, test examples) of each client with a non-empty test split.

    ``personal_accuracy`` = all clients' correct predictions / all their test examples, i.e. the mean of
    the client accuracies weighted by test size; ``personal_accuracy_client_mean`` = their plain mean;
    ``personal_accuracy_min`` = the worst client's. Empty input -> {}.

    >>> personal_summary([(1.0, 3), (0.5, 2)])
    {'personal_accuracy': 0.8, 'personal_accuracy_min': 0.5, 'personal_accuracy_client_mean': 0.75}
    """
    if not per_client:
        return {}
    correct, total = 0.0, 0
    for acc, n in per_client:
        correct, total = correct + acc * n, total + n
    accs = [acc for acc, _ in per_client]
    return {
        "personal_accuracy": correct / total,
        "personal_accuracy_min": min(accs),
        "personal_accuracy_client_mean": sum(accs) / len(accs),
    }


def fit_remap(
    scores: torch.Tensor, labels: torch.Tensor, config: ZooPFLConfig, rounds: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """ZooPFL's private semantic re-mapping fitted on fixed black-box scores [B, C], from the identity.

    The same layer and schedule as a client of ZooPFL's re-mapping-only ablation (``surgery=False``) for
    ``rounds`` rounds: per round a fresh Adam (``remap_lr``) and ``local_steps`` x ``remap_steps``
    gradient steps of cross-entropy. Returns (weight [C, C], bias [C]); mapped scores = scores @ W.T + b.
    """
    c = scores.shape[-1]
    weight = torch.eye(c, dtype=torch.float32).requires_grad_(True)
    bias = torch.zeros(c, dtype=torch.float32).requires_grad_(True)
    if len(labels):  # a client without training data keeps the identity
        for _ in range(rounds):
            opt = torch.optim.Adam([weight, bias], lr=config.remap_lr)
            for _ in range(config.local_steps):
                _fit_remap(weight, bias, opt, scores.float().cpu(), labels.cpu(), config.remap_steps)
    return weight.detach().numpy().copy(), bias.detach().numpy().copy()


def _fit_remap(weight, bias, opt, scores: torch.Tensor, labels: torch.Tensor, steps: int) -> None:
    """Semantic re-mapping: a few gradient steps of a linear layer on the (fixed) black-box scores."""
    scores = scores.clone()  # black-box scores come from inference mode; a normal tensor can enter autograd
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(scores @ weight.T + bias, labels).backward()
        opt.step()


def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(-1) == labels.cpu()).float().mean())
