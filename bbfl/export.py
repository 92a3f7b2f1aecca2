"""Export a run's result as a Hugging Face PEFT adapter, where PEFT's formats can express it.

* A soft prompt (``bbfl bbt`` / ``bbfl fedbpt``, or ``--peft prompt`` of fwdllm/fedkseed) becomes a
  PEFT prompt-tuning adapter. PEFT prepends its virtual tokens to ``inputs_embeds`` at position 0 and
  extends the attention mask with ones; bbfl puts the prompt after the tokenizer's first [CLS]/<s>
  when there is one. So only runs whose tokenizer adds no leading special token (GPT-2 style), read
  with the causal head and the plain (``full``) attention, export: the others would score differently
  and are refused with the reason. The encoder head (MiniLM default) is refused too: it leaves the
  prompt positions out of its mean pooling, which a PEFT model's output does not.
* LoRA (fwdllm/fedkseed ``--peft lora``) becomes a PEFT LoRA adapter on the same linear layers with
  the same rank and alpha (PEFT's update is ``lora_alpha / r * B A x``, bbfl's too).
* BitFit, bottleneck adapters and full deltas have no PEFT format here: refused.

The files are written by ``peft`` itself (``PeftModel.save_pretrained``), so that
``peft.PeftModel.from_pretrained(base, out_dir)`` loads them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bbfl.exceptions import ConfigError
from bbfl.io import load_arrays
from bbfl.report import RunDir

PEFT_INSTALL = "bbfl export needs the `peft` package: pip install 'bbfl[export]'"


def _require_peft():
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is in the test extra
        raise ConfigError(PEFT_INSTALL) from exc
    return peft


def export_run(run_dir: str | Path, out_dir: str | Path) -> tuple[Path, str]:
    """Write ``out_dir/adapter_config.json`` + ``adapter_model.safetensors``; returns (out_dir, kind)."""
    run = RunDir.open(run_dir)
    config = run.config
    method = config.get("method", "bbt")
    blackbox = config.get("blackbox") or {}
    if method in ("bbt", "fedbpt"):
        arrays, _ = _result(run, "prompt.safetensors")
        return _export_prompt(torch.from_numpy(arrays["prompt"]), blackbox, out_dir), "prompt tuning"
    if method in ("fwdllm", "fedkseed"):
        options = config.get(method) or {}
        kind = options.get("peft", "lora")
        arrays, _ = _result(run, "peft.safetensors")
        if kind == "prompt":
            return _export_prompt(torch.from_numpy(arrays["prompt"]), blackbox, out_dir), "prompt tuning"
        if kind == "lora":
            return _export_lora(arrays, blackbox, options, out_dir), "LoRA"
        raise ConfigError(
            f"a {kind!r} result has no Hugging Face PEFT format bbfl can write (PEFT has LoRA and prompt tuning, "
            "not bbfl's bias deltas, bottleneck adapters or full deltas); use `bbfl predict` instead"
        )
    if method in ("bdpl", "fedone"):
        raise ConfigError(f"a {method} result is a discrete prompt (text), not a PEFT adapter")
    raise ConfigError(f"bbfl export reads bbt, fedbpt, fwdllm and fedkseed runs; {run.path} is a {method!r} run")


def _save(model, out_dir) -> Path:
    """``save_pretrained``, then the files follow the user's umask like every run file (peft writes 0600)."""
    import os

    from bbfl.io import current_umask

    model.save_pretrained(out_dir)
    for path in Path(out_dir).iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~current_umask())
    return Path(out_dir)


def _result(run: RunDir, name: str):
    path = run.path / name
    if not path.is_file():
        raise ConfigError(f"{run.path} has no {name}: the run did not finish")
    return load_arrays(path)


def model_path(blackbox: dict) -> str:
    """The run's model as a path or hub name transformers loads: the embedded default (recorded as None)
    is this installation's copy, a named model or GGUF file its cached conversion."""
    from bbfl.blackbox.loading import default_model_path
    from bbfl.models import resolve_model

    model = blackbox.get("model")
    if model is None:
        return default_model_path()
    if not isinstance(model, str) or model.startswith(("http://", "https://")):
        raise ConfigError(f"export needs the run's local model, not the endpoint {model!r}")
    return resolve_model(model)


def _base_model(path: str, blackbox: dict):
    from bbfl.blackbox.loading import load_model

    return load_model(path, blackbox.get("head", "auto"), torch.float32).eval()


def prompt_refusal(blackbox: dict) -> str | None:
    """Why a soft prompt on this black box is not a PEFT prompt-tuning adapter (None: it is)."""
    from transformers import AutoTokenizer

    placement = blackbox.get("prompt_placement", "inputs_embeds")  # records before the option: inputs_embeds
    if placement != "inputs_embeds":
        return (
            f"the prompt is added with prompt_placement={placement!r} (after the embedding LayerNorm); "
            "PEFT prompt tuning only prepends to inputs_embeds"
        )
    if blackbox.get("prompt_attention") == "prefix":
        return "the run used prompt_attention='prefix' (the prompt reads only itself); PEFT's prompt attends to all"
    head = blackbox.get("head")
    if head != "causal":
        why = "leaves the prompt out of its mean pooling" if head == "encoder" else "reads a [MASK] after [CLS]"
        return f"the {head} head {why}; PEFT prompt tuning exports here only for causal LMs"
    tokenizer = AutoTokenizer.from_pretrained(model_path(blackbox))
    first = tokenizer("a")["input_ids"][0]
    if first in (tokenizer.cls_token_id, tokenizer.bos_token_id):
        return (
            "bbfl inserts the prompt after the tokenizer's leading special token "
            f"{tokenizer.convert_ids_to_tokens(first)!r}; PEFT prepends virtual tokens before it"
        )
    return None


def _export_prompt(prompt: torch.Tensor, blackbox: dict, out_dir) -> Path:
    reason = prompt_refusal(blackbox)
    if reason is not None:
        raise ConfigError(f"this soft prompt is not expressible as a PEFT prompt-tuning adapter: {reason}")
    peft = _require_peft()
    path = model_path(blackbox)  # resolved once: a GGUF model's resolution hashes its file
    base = _base_model(path, blackbox)
    if base.get_input_embeddings().weight.shape[1] != prompt.shape[1]:
        raise ConfigError(f"the prompt is {prompt.shape[1]}-wide, the run's model embeds in another width")
    cfg = peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=int(prompt.shape[0]), base_model_name_or_path=path
    )
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(prompt)
    return _save(model, out_dir)


def _export_lora(arrays: dict, blackbox: dict, options: dict, out_dir) -> Path:
    peft = _require_peft()
    names = sorted({k.rsplit(".lora_", 1)[0] for k in arrays if ".lora_" in k})
    if not names:
        raise ConfigError(f"peft.safetensors holds no LoRA tensors (keys: {sorted(arrays)[:3]})")
    path = model_path(blackbox)  # resolved once: a GGUF model's resolution hashes its file
    base = _base_model(path, blackbox)
    rank, alpha = int(options.get("rank", 8)), float(options.get("alpha", 16.0))
    task_type = "CAUSAL_LM" if blackbox.get("head") == "causal" else None
    cfg = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=names,  # the exact layers bbfl tuned
        task_type=task_type,
        base_model_name_or_path=path,
    )
    model = peft.get_peft_model(base, cfg)
    inner = model.base_model.model
    with torch.no_grad():
        for name in names:
            layer = inner.get_submodule(name)
            layer.lora_A["default"].weight.copy_(torch.from_numpy(arrays[f"{name}.lora_A"]))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(arrays[f"{name}.lora_B"]))
    return _save(model, out_dir)
