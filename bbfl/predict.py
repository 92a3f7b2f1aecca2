"""Classify new texts with a finished run's result: ``bbfl predict RUN_DIR``.

A run directory says what it tuned (config.json) and holds the result: ``prompt.safetensors`` (a
soft prompt from ``bbfl bbt`` / ``bbfl fedbpt``) or ``peft.safetensors`` (LoRA, BitFit, adapter,
prompt or full deltas from ``bbfl fwdllm`` / ``bbfl fedkseed``). :class:`Predictor` rebuilds the
run's black box (or another one given by ``model``) and scores texts in batches, with exactly the
code path the run evaluated its test split with, so a prediction equals the run's own evaluation.

>>> # p = Predictor("runs/bbt-sst2-..."); labels, probs = p.predict(["a gripping film"])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bbfl.data import Split, Task, load_task
from bbfl.data.loaders import SPEC_KEYS
from bbfl.exceptions import ConfigError, DataError
from bbfl.io import load_arrays
from bbfl.methods.bbt.experiment import SOFT_PROMPT_METHODS
from bbfl.methods.fwdllm.experiment import FORWARD_METHODS as PEFT_METHODS
from bbfl.report import RunDir

PERSONAL_METHODS = ("zoopfl",)


def task_of_run(config: dict, data_dir: str | None = None) -> Task:
    """The run's task (classes, template, words, descriptions), read defensively from config.json.

    Newer config.json files record the resolved task (``resolved_task``); it wins over the spec
    file, which may have changed or gone since. ``data_dir`` replaces the recorded folder (a run
    directory copied to another machine).
    """
    data = config.get("data") or {}
    if "task" not in data:
        raise ConfigError("config.json has no data.task: not a run directory bbfl predict can read")
    overrides = dict(data.get("spec_overrides") or {})
    recorded = {k: v for k, v in (config.get("resolved_task") or {}).items() if k in SPEC_KEYS}
    spec_file = data.get("spec_file")
    if recorded:
        overrides, spec_file = {**recorded, **overrides}, None
    folder = data_dir or data.get("data_dir")
    if folder is not None and not Path(folder).is_dir() and data_dir is None:
        raise ConfigError(f"the run's data folder {folder!r} is not here: pass --data-dir with the task's files")
    return load_task(data["task"], data_dir=folder, spec_file=spec_file, **overrides)


def batches(n: int, size: int) -> Iterator[slice]:
    if size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {size}")
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class Predictor:
    """A run's result on a black box, ready to score texts.

    Args:
        run_dir: a finished run directory (bbt, fedbpt, fwdllm or fedkseed).
        model: another black box than the run's (local dir, hub name or ``bbfl serve`` URL).
        data_dir: where the run's task files are, if not where config.json says.
        client: a ZooPFL client whose private surgery and re-mapping are used (``None``: the shared
            surgery with a neutral client embedding and no re-mapping, as the run's global accuracy).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        model: str | None = None,
        data_dir: str | None = None,
        client: int | None = None,
    ) -> None:
        from bbfl.experiment import BlackBoxConfig

        self.run = RunDir.open(run_dir)
        config = self.run.config
        self.method = config.get("method", "bbt")  # early bbt runs did not record it
        self.task = task_of_run(config, data_dir)
        bb_cfg = BlackBoxConfig.from_saved(config.get("blackbox") or {})
        if model is not None:
            bb_cfg = replace(bb_cfg, model=model, head="auto", prompt_attention="auto")
        self.zoopfl, self.client = None, client
        if client is not None and self.method not in PERSONAL_METHODS:
            raise ConfigError(f"--client picks a ZooPFL client's model; {self.run.path} is a {self.method} run")
        if self.method in SOFT_PROMPT_METHODS:
            self.prompt = self._load_prompt()
            self.blackbox = bb_cfg.build()
            self._check_prompt_width()
            self.weights = None
        elif self.method in PEFT_METHODS:
            self.prompt, self.weights = None, None
            self._load_peft(config, bb_cfg)
        elif self.method in PERSONAL_METHODS:
            self.prompt, self.weights = None, None
            self._load_zoopfl(config, bb_cfg, data_dir)
        else:
            raise ConfigError(
                f"bbfl predict reads runs of {', '.join(SOFT_PROMPT_METHODS + PEFT_METHODS + PERSONAL_METHODS)}; "
                f"{self.run.path} is a {self.method!r} run"
            )
        # the phrasing the model reads (a causal head: the task's causal template, if it has one)
        self.task = self.task.for_head(getattr(self.blackbox, "head", ""))

    @property
    def labels(self) -> list[str]:
        return list(self.task.labels)

    def _load_prompt(self) -> torch.Tensor:
        path = self.run.path / "prompt.safetensors"
        if not path.is_file():
            raise ConfigError(f"{self.run.path} has no prompt.safetensors: the run did not finish")
        arrays, _ = load_arrays(path)
        if "prompt" not in arrays or arrays["prompt"].ndim != 2:
            raise ConfigError(f"{path}: expected a 2-D 'prompt' array, found {sorted(arrays)}")
        return torch.from_numpy(arrays["prompt"])

    def _check_prompt_width(self) -> None:
        width = getattr(self.blackbox, "hidden_size", self.prompt.shape[1])
        if width != self.prompt.shape[1]:
            raise ConfigError(
                f"the run's prompt is {self.prompt.shape[1]}-wide but model {self.blackbox.model_name!r} embeds "
                f"in {width} dimensions: --model must be the run's model or one of the same width"
            )

    def _load_peft(self, config: dict, bb_cfg) -> None:
        from bbfl.methods.fwdllm.experiment import forward_blackbox, forward_config

        path = self.run.path / "peft.safetensors"
        if not path.is_file():
            raise ConfigError(f"{self.run.path} has no peft.safetensors: the run did not finish")
        method_cfg = forward_config(self.method, config[self.method])
        if bb_cfg.model and bb_cfg.model.startswith(("http://", "https://")):
            raise ConfigError(
                f"{self.method} weights act inside the model's layers: they need a local --model, not {bb_cfg.model}"
            )
        from bbfl.peft import PeftWeights

        self.blackbox = forward_blackbox(bb_cfg, method_cfg.peft).build()
        self.weights = PeftWeights(self.blackbox, method_cfg.peft_config(), seed=method_cfg.seed)
        arrays, _ = load_arrays(path)
        self.weights.load_arrays(arrays)

    def _load_zoopfl(self, config: dict, bb_cfg, data_dir: str | None) -> None:
        """The run's ZooPFL (rebuilt on its federation: the encoder's shapes) with its saved states.

        Reads the server checkpoint and the client's newest state file of a finished round, without
        touching the run directory (a resume would delete files of an unfinished round; predict does not).
        """
        import json

        from bbfl.federation.engine import _client_files
        from bbfl.methods.registry import build_federated_method

        ckpt = self.run.path / "server_state.safetensors"
        if not ckpt.is_file():
            raise ConfigError(f"{self.run.path} has no server_state.safetensors: no round finished")
        if data_dir is not None:
            config = {**config, "data": {**config["data"], "data_dir": data_dir}}
        config = {**config, "blackbox": {**config["blackbox"], "model": bb_cfg.model}}
        method, _ = build_federated_method(config)
        arrays, meta = load_arrays(ckpt)
        method.load_state(arrays, json.loads(meta["method"]))
        done = json.loads(meta["engine"])["round"]
        if self.client is not None:
            if not 0 <= self.client < method.num_clients:
                raise ConfigError(f"--client {self.client} is not a client of this run (0..{method.num_clients - 1})")
            files = {r: p for r, p in _client_files(self.run.path, self.client).items() if r <= done}
            if files:
                method.load_client_state(self.client, load_arrays(files[max(files)])[0])
        self.zoopfl, self.blackbox = method, method.blackbox

    def _zoopfl_scores(self, data) -> torch.Tensor:
        # ZooPFL's own scoring (method._scores): the surgery's per-example prefixes, then the client's
        # re-mapping of the class scores; the global model is the shared encoder and a zero embedding
        from bbfl.methods.zoopfl.method import example_features

        method, feats = self.zoopfl, example_features(self.blackbox, data)
        if self.client is None:
            embedding = torch.zeros(method.config.client_embed_dim)
            return method._scores(method.encoder, embedding, feats, data)
        state = method._client_state(self.client)
        personal = {k[4:]: v for k, v in state.items() if k.startswith("enc.")}
        encoder = method._module_from(personal) if personal else method.encoder
        scores = method._scores(encoder, torch.from_numpy(state["embedding"]), feats, data)
        return scores @ torch.from_numpy(state["remap_weight"]).T + torch.from_numpy(state["remap_bias"])

    # ------------------------------------------------------------------ scoring
    def scores(self, split: Split) -> torch.Tensor:
        """[B, C] class scores of ``split`` (its labels are ignored), as the run's evaluation computes them."""
        data = self.blackbox.encode(self.task, split)
        if self.zoopfl is not None:
            return self._zoopfl_scores(data).float()
        if self.weights is not None:
            with torch.inference_mode():
                return self.weights.scores(data).float().cpu()
        return self.blackbox.logits(self.prompt[None], data)[0].float().cpu()

    def predict(
        self,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None = None,
        *,
        batch_size: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(predicted class index [N], class probabilities [N, C]) of ``texts``, ``batch_size`` at a time."""
        if not texts:
            raise DataError("no texts to classify")
        if self.task.template.count("{text_pair}") and text_pairs is None:
            raise DataError(f"task {self.task.name!r} reads text pairs: give a 'text_pair' column")
        probs = []
        for part in batches(len(texts), batch_size):
            pairs = None if text_pairs is None else list(text_pairs[part])
            split = Split(list(texts[part]), np.zeros(part.stop - part.start, dtype=np.int64), pairs)
            scores = self.scores(split)
            if not torch.isfinite(scores).all():
                raise ConfigError(f"the black box returned non-finite scores for rows {part.start + 1}-{part.stop}")
            probs.append(torch.softmax(scores, dim=-1).numpy())
            if on_batch is not None:
                on_batch(part.stop - part.start)
        out = np.concatenate(probs)
        return out.argmax(-1), out
