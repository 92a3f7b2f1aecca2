"""Black-Box Tuning: CMA-ES in a random low-dimensional subspace projected to a soft prompt.

Implementation based on Sun et al., "Black-Box Tuning for Language-Model-as-a-Service", ICML 2022
(https://arxiv.org/abs/2201.03514). Differences from the official loop: the whole CMA-ES population
is scored in one black-box call (batched, length-bucketed), and every RNG is private and seeded.
Where the prompt enters the model is the black box's ``prompt_placement`` (official: A z added to the
embedding layer's output, :mod:`bbfl.blackbox.placement`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bbfl.blackbox import Encoded, LocalBlackBox
from bbfl.exceptions import CheckpointError
from bbfl.io import load_arrays, save_arrays
from bbfl.methods.bbt.config import BBTConfig
from bbfl.methods.losses import accuracy, get_loss
from bbfl.optim import CMAES


class SubspaceProjection:
    """p = A z + p0 with A in R^{(L*H) x d} fixed and random.

    A_ij ~ N(0, std^2) with std = alpha * sigma_emb / (sqrt(d) * sigma0) (BBT's scaling, so that a
    step of size sigma0 in z moves the prompt on the scale of the word embeddings). A is rebuilt
    from ``seed`` alone, so a saved prompt needs only z and the seed.
    """

    def __init__(
        self,
        intrinsic_dim: int,
        prompt_init: torch.Tensor,
        embedding_std: float,
        alpha: float = 1.0,
        sigma0: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.prompt_length, self.hidden_size = prompt_init.shape
        self.std = alpha * embedding_std / (math.sqrt(intrinsic_dim) * sigma0)
        generator = torch.Generator().manual_seed(seed)
        n_out = self.prompt_length * self.hidden_size
        self.A = torch.randn(n_out, intrinsic_dim, generator=generator).mul_(self.std).to(prompt_init.device)
        self.p0 = prompt_init.float()
        self.seed = seed

    def __call__(self, z: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[P, d] -> [P, L, H] prompts (a single [d] vector gives [1, L, H])."""
        z = torch.as_tensor(np.atleast_2d(np.asarray(z, dtype=np.float32)), device=self.A.device)
        return (z @ self.A.T).view(-1, self.prompt_length, self.hidden_size) + self.p0


@dataclass
class BBTResult:
    z_best: np.ndarray  # the dev-selected z
    dev_accuracy: float
    dev_loss: float
    start_dev_accuracy: float  # z = 0, i.e. the prompt p0 alone
    train_queries: int
    dev_queries: int
    history: list[dict] = field(default_factory=list)
    z_mean: np.ndarray | None = None  # CMA-ES's final mean (FedBPT's one-client equivalence is checked on it)


def evaluate_prompt(
    blackbox: LocalBlackBox, prompt: torch.Tensor | None, data: Encoded, loss_name: str = "ce", margin: float = 2.0
) -> tuple[float, float]:
    """(accuracy, loss) of one prompt ([L, H] or [1, L, H]; ``None`` = no prompt) on ``data``."""
    if prompt is not None and prompt.dim() == 2:
        prompt = prompt[None]
    scores = blackbox.logits(prompt, data)
    return float(accuracy(scores, data.labels)[0]), float(get_loss(loss_name, margin)(scores, data.labels)[0])


def run_bbt(
    config: BBTConfig,
    blackbox: LocalBlackBox,
    train: Encoded,
    dev: Encoded,
    projection: SubspaceProjection,
    loss_name: str = "ce",
    on_generation: Callable[[dict], None] | None = None,
    checkpoint: str | Path | None = None,
) -> BBTResult:
    """Minimise the train loss over z with CMA-ES; keep the z with the best dev accuracy.

    Dev selection happens every ``config.eval_every`` training queries, on the generation's best
    candidate and on the CMA-ES mean. Training stops before it would pass ``config.budget``.

    With ``checkpoint``, every generation's losses are saved there atomically (safetensors). If the
    file exists, the run resumes: CMA-ES is rebuilt by *replaying* the saved losses through
    ask/tell with the same seed - no black-box queries, no pickled optimizer - so a resumed run
    ends exactly where an uninterrupted one would.
    """
    loss_fn = get_loss(loss_name, config.margin)
    es = CMAES(np.zeros(config.intrinsic_dim), config.sigma0, config.popsize, seed=config.seed)
    state = _load_checkpoint(checkpoint, es) if checkpoint and Path(checkpoint).is_file() else None
    if state is None:
        zero = np.zeros(config.intrinsic_dim)
        start_acc, start_loss = evaluate_prompt(blackbox, projection(zero), dev, loss_name, config.margin)
        state = {
            "best": {"acc": start_acc, "loss": start_loss, "z": zero},
            "start_acc": start_acc,
            "queries": 0,
            "dev_queries": 1,
            "next_eval": config.eval_every,
            "history": [],
            "losses": [],
            "probes": [],
        }
    best, history = state["best"], state["history"]
    while state["queries"] + es.popsize <= config.budget:
        candidates = es.ask()
        scores = blackbox.logits(projection(candidates), train)
        losses = loss_fn(scores, train.labels).cpu().numpy().astype(np.float64)
        es.tell(candidates, losses)
        state["queries"] += len(candidates)
        top = int(np.argmin(losses))
        record = {
            "generation": len(history) + 1,
            "queries": state["queries"],
            "train_loss": float(losses[top]),
            "train_loss_mean": float(losses.mean()),
            "train_accuracy": float(accuracy(scores[top : top + 1], train.labels)[0]),
            "sigma": es.sigma,
        }
        if state["queries"] >= state["next_eval"]:
            accs = []
            for z in (candidates[top], es.mean):
                acc, loss = evaluate_prompt(blackbox, projection(z), dev, loss_name, config.margin)
                accs.append(acc)
                state["dev_queries"] += 1
                if acc > best["acc"] or (acc == best["acc"] and loss < best["loss"]):
                    best.update(acc=acc, loss=loss, z=np.array(z))
            record.update(dev_accuracy=max(accs), best_dev_accuracy=best["acc"])
            overdue = math.ceil((state["queries"] - state["next_eval"] + 1) / config.eval_every)
            state["next_eval"] += config.eval_every * max(1, overdue)
        history.append(record)
        state["losses"].append(losses)
        state["probes"].append(_probe(candidates))
        if checkpoint:
            state["blackbox_stats"] = blackbox.counter.stats.as_dict()  # a resumed run's totals start from these
            _save_checkpoint(checkpoint, state)
        if on_generation is not None:
            on_generation(record)
    return BBTResult(
        z_best=best["z"],
        dev_accuracy=best["acc"],
        dev_loss=best["loss"],
        start_dev_accuracy=state["start_acc"],
        train_queries=state["queries"],
        dev_queries=state["dev_queries"],
        history=history,
        z_mean=es.mean,
    )


def _probe(candidates: np.ndarray) -> float:
    # a fingerprint of a generation's candidates, to check that a replay really reproduces them
    return float(np.asarray(candidates, dtype=np.float64).sum())


def _save_checkpoint(path: str | Path, state: dict) -> None:
    meta = {k: state[k] for k in ("start_acc", "queries", "dev_queries", "next_eval", "history")}
    meta["best_acc"], meta["best_loss"] = state["best"]["acc"], state["best"]["loss"]
    meta["blackbox_stats"] = state.get("blackbox_stats")
    save_arrays(
        path,
        {"losses": np.stack(state["losses"]), "probes": np.array(state["probes"]), "best_z": state["best"]["z"]},
        {"state": json.dumps(meta)},
    )


def _load_checkpoint(path: str | Path, es: CMAES) -> dict:
    arrays, meta = load_arrays(path)
    saved = json.loads(meta["state"])
    losses, probes = arrays["losses"], arrays["probes"]
    for generation, (gen_losses, probe) in enumerate(zip(losses, probes), 1):
        candidates = es.ask()
        if not np.isclose(_probe(candidates), probe, rtol=0, atol=1e-9 * max(1.0, abs(probe))):
            raise CheckpointError(
                f"{path}: replaying generation {generation} gave different candidates; the checkpoint "
                "belongs to another seed, dimension or popsize"
            )
        es.tell(candidates, gen_losses)
    return {
        **{k: saved[k] for k in ("start_acc", "queries", "dev_queries", "next_eval", "history")},
        "best": {"acc": saved["best_acc"], "loss": saved["best_loss"], "z": arrays["best_z"]},
        "losses": list(losses),
        "probes": list(probes),
    }


def checkpoint_history(path: str | Path) -> list[dict]:
    """The per-generation records stored in a BBT checkpoint (to rebuild metrics on resume)."""
    _, meta = load_arrays(path)
    return json.loads(meta["state"])["history"]
