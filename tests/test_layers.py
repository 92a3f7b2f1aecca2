"""The package's layers never import upward, and no module grows past ~400 lines without saying why.

Layers, low to high (a module may import its own layer and those below it; lazy imports inside
functions count too):

0. plumbing: exceptions, io, memory, models, peft, optim, data, report, processes
1. black boxes: bbfl.blackbox
2. federation: bbfl.federation (the engine and its contract; it knows no method)
3. shared experiment configs: bbfl.experiment
4. methods: bbfl.methods (each method's config, algorithm and experiment runner)
5. front ends below the CLI: predict, export, compare, serve, flower
6. the CLI
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bbfl"
LAYERS = {
    "exceptions": 0, "io": 0, "memory": 0, "models": 0, "peft": 0, "optim": 0, "data": 0, "report": 0,
    "processes": 0,
    "blackbox": 1,
    "federation": 2,
    "experiment": 3,
    "methods": 4,
    "predict": 5, "export": 5, "compare": 5, "serve": 5, "flower": 5,
    "cli": 6, "__main__": 6,
}  # fmt: skip
LONG_MODULE_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _imports(module: str, path: Path) -> set[str]:
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names |= {target} if node.module else {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return {n for n in names if n == "bbfl" or n.startswith("bbfl.")}


def test_every_top_level_module_has_a_layer():
    unplaced = {m.split(".")[1] for m in _modules() if "." in m} - set(LAYERS)
    assert not unplaced, f"place these in LAYERS (tests/test_layers.py): {sorted(unplaced)}"


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    upward = []
    for module, path in _modules().items():
        here = _layer(module)
        if here is None:
            continue
        for target in _imports(module, path):
            there = _layer(target)
            if there is not None and there > here:
                upward.append(f"{module} (layer {here}) imports {target} (layer {there})")
    assert not upward, "\n".join(sorted(upward))


def test_long_modules_say_why():
    unexplained = []
    for module, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > LONG_MODULE_LINES and "Why this module is long" not in (
            ast.get_docstring(ast.parse(text)) or ""
        ):
            unexplained.append(f"{module}: {text.count(chr(10))} lines")
    assert not unexplained, "split these or say 'Why this module is long: ...' in the docstring:\n" + "\n".join(
        unexplained
    )


def test_the_check_sees_an_upward_import(tmp_path):
    """The walker itself: a federation module importing a method is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from bbfl.methods.fedbpt import FedBPT\n")
    targets = _imports("bbfl.federation.bad", bad)
    assert "bbfl.methods.fedbpt" in targets and _layer("bbfl.methods.fedbpt") > _layer("bbfl.federation.bad")
