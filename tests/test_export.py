"""`bbfl export`: runs as Hugging Face PEFT adapters, loaded back with the real `peft` package.

Each export is checked the only way that counts: ``peft.PeftModel.from_pretrained(base, dir)`` gives
the same class logits as bbfl's own scoring of the run (``Predictor.scores``), on real SST-2 rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bbfl.cli import app
from tests.conftest import require_module
from tests.test_predict import forward_run, only_run, small_sst2

require_module("peft")  # bbfl export is tested against the real peft package (test extra); CI fails without it
import peft  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_sst2(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def gpt2_without_specials(tiny_models, tmp_path_factory) -> Path:
    """The tiny GPT-2 with a tokenizer that adds no [CLS]/<s>: where bbfl's prompt sits at position 0."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("gpt2plain")
    for f in tiny_models["gpt2"].iterdir():
        if not f.name.startswith("tokenizer") and f.name != "special_tokens_map.json":
            shutil.copy(f, folder / f.name)
    backend = AutoTokenizer.from_pretrained(tiny_models["gpt2"]).backend_tokenizer
    backend.post_processor = TemplateProcessing(single="$A", pair="$A $B")
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    plain.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder)("a film")["input_ids"][0] not in (101, None)
    return folder


def export(run_dir: Path, out: Path) -> Path:
    result = runner.invoke(app, ["export", str(run_dir), str(out)])
    assert result.exit_code == 0, result.output
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    return out


def test_lora_export_loads_in_peft_with_bbfls_logits(data, tiny_models, tmp_path):
    from transformers import AutoModelForMaskedLM

    from bbfl.predict import Predictor

    # a large step, so that the tuned model is far from the frozen one and a wrong export shows
    run_dir = forward_run(data, tmp_path / "runs", tiny_models["bert"], peft="lora", extra=("--lr", "100"))
    out = export(run_dir, tmp_path / "adapter")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    predictor = Predictor(run_dir)
    split = predictor.task.test
    expected = predictor.scores(split)  # [B, C]

    base = AutoModelForMaskedLM.from_pretrained(tiny_models["bert"]).eval()
    model = peft.PeftModel.from_pretrained(base, out).eval()
    tok = predictor.blackbox.tokenizer
    enc = tok(predictor.task.format(split, tok.mask_token), padding=True, return_tensors="pt")
    rows, cols = torch.nonzero(enc["input_ids"] == tok.mask_token_id, as_tuple=True)
    label_ids = predictor.blackbox.label_ids
    with torch.inference_mode():
        got = model(**enc).logits[rows, cols][:, label_ids]
        with model.disable_adapter():
            frozen = model(**enc).logits[rows, cols][:, label_ids]
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)
    assert np.abs(frozen - expected).max() > 1e-3  # the LoRA update is in the adapter


def test_soft_prompt_export_loads_in_peft_with_bbfls_logits(data, gpt2_without_specials, tmp_path):
    from transformers import AutoModelForCausalLM

    from bbfl.predict import Predictor

    args = ["bbt", "--task", "sst2", "--data-dir", str(data), "--model", str(gpt2_without_specials)]
    args += ["--budget", "20", "--popsize", "10", "--prompt-length", "4", "--intrinsic-dim", "20", "--k-shot", "4"]
    args += ["--eval-every", "10", "--out", str(tmp_path / "runs")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = only_run(tmp_path / "runs")
    out = export(run_dir, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4

    predictor = Predictor(run_dir)
    split = predictor.task.test.head(8)
    expected = predictor.scores(split)
    base = AutoModelForCausalLM.from_pretrained(gpt2_without_specials).eval()
    model = peft.PeftModel.from_pretrained(base, out).eval()
    tok, label_ids = predictor.blackbox.tokenizer, predictor.blackbox.label_ids
    got = []
    with torch.inference_mode():
        for text in predictor.task.format_before_mask(split):  # one at a time: no padding to line up
            ids = tok(text, return_tensors="pt")
            got.append(model(**ids).logits[0, -1, label_ids])  # PEFT's output includes the virtual tokens
    np.testing.assert_allclose(torch.stack(got).numpy(), expected.numpy(), atol=1e-4)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"prompt_placement": "after_embeddings", "head": "causal"}, "after the embedding LayerNorm"),
        ({"prompt_attention": "prefix", "head": "mlm"}, "prompt_attention='prefix'"),
        ({"prompt_attention": "full", "head": "encoder"}, "mean pooling"),
        ({"prompt_attention": "full", "head": "mlm"}, "[MASK] after [CLS]"),
        ({"prompt_attention": "full", "head": "causal", "model": "gpt2"}, "leading special token '[CLS]'"),
    ],
)
def test_prompts_peft_cannot_express_are_refused_with_the_reason(record, reason, tiny_models):
    from bbfl.export import prompt_refusal

    record = {**record, "model": str(tiny_models[record.get("model", "bert")])}
    assert reason in prompt_refusal(record)


def test_bitfit_export_is_refused_in_one_line(data, tiny_models, tmp_path):
    run_dir = forward_run(data, tmp_path / "runs", tiny_models["bert"], peft="bitfit")
    result = runner.invoke(app, ["export", str(run_dir), str(tmp_path / "adapter")])
    assert result.exit_code == 2 and "'bitfit' result has no Hugging Face PEFT format" in result.output
    assert not (tmp_path / "adapter").exists()


def test_lora_export_of_a_run_on_the_embedded_model(data, tmp_path):
    """The default model is recorded as None (portable run dirs): export resolves it to the installed copy."""
    import os
    import stat

    from transformers import AutoModel

    from bbfl.blackbox import default_model_path
    from bbfl.io import current_umask, load_arrays

    args = ["fwdllm", "--task", "sst2", "--data-dir", str(data), "--rounds", "1", "--clients", "2"]
    args += ["--k-shot", "4", "--peft", "lora", "--lr", "100", "--out", str(tmp_path / "runs")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = only_run(tmp_path / "runs")
    assert json.loads((run_dir / "config.json").read_text())["blackbox"]["model"] is None
    out = export(run_dir, tmp_path / "adapter")
    for path in out.iterdir():  # peft writes 0600; export leaves the files as the umask says
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~current_umask(), path
    model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(default_model_path()), out).eval()
    arrays, _ = load_arrays(run_dir / "peft.safetensors")
    name = next(k for k in arrays if k.endswith(".lora_B"))
    exported = model.base_model.model.get_submodule(name.rsplit(".lora_", 1)[0]).lora_B["default"].weight
    assert np.abs(arrays[name]).max() > 0  # the run moved B away from its zero start
    np.testing.assert_array_equal(exported.detach().numpy(), arrays[name])
