"""Loading tasks from local files (jsonl/json/csv/tsv), the bundled demo, or the `datasets` hub."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from bbfl.data.registry import TASKS, TaskSpec
from bbfl.data.task import Split, Task
from bbfl.exceptions import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
DEFAULT_TEMPLATE = "{text} . {mask} ."
_log = logging.getLogger("bbfl.data")
SPEC_KEYS = {*Task.SPEC_KEYS, "text_col", "pair_col", "label_col"}  # what a spec file or override may set
CAUSAL_KEYS = ("causal_template", "causal_label_words")


def read_text(path: str | Path) -> str:
    """A file's text as UTF-8 (a BOM, as Excel writes, is dropped); anything else is a DataError with the offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)  # offsets count from after a BOM
        raise DataError(
            f"{path}: not UTF-8 text: byte {data[offset : offset + 1]!r} at byte offset {offset} cannot be decoded; "
            "expected UTF-8 (re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`)"
        ) from exc


def read_records(
    path: str | Path,
    *,
    text_col: str = "text",
    pair_col: str | None = None,
    label_col: str = "label",
    strict: bool = False,
) -> list[dict]:
    """Rows of a data file as ``{"text", "label"[, "text_pair"]}`` dicts, checked for the columns.

    Rows whose text is empty or whitespace only are skipped with a warning giving their count and
    first row numbers (CR's files hold three); ``strict`` refuses the file instead.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    wanted = [text_col, label_col] + ([pair_col] if pair_col else [])
    missing = [c for c in wanted if c not in rows[0]]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns found: {sorted(rows[0])}")
    out, blank = [], []
    for i, row in enumerate(rows, 1):
        text = row.get(text_col)
        if text is None or (isinstance(text, str) and not text.strip()):
            if strict:
                raise DataError(f"{path}: row {i} has an empty {text_col!r}: {text!r} (without --strict it is skipped)")
            blank.append(i)
            continue
        if not isinstance(text, str):
            raise DataError(f"{path}: row {i} has a non-text {text_col!r}: {text!r}")
        rec = {"text": text, "label": row.get(label_col)}
        if pair_col:
            rec["text_pair"] = str(row.get(pair_col) or "")
        out.append(rec)
    if blank:
        first = ", ".join(map(str, blank[:5])) + (", ..." if len(blank) > 5 else "")
        _log.warning(
            "%s: skipped %d row(s) with an empty %r (rows %s); --strict refuses such files",
            path,
            len(blank),
            text_col,
            first,
        )
    if not out:
        raise DataError(f"{path}: every row has an empty {text_col!r}")
    return out


def _read_rows(path: Path) -> list[dict]:
    text = read_text(path)
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {i} is not valid JSON ({exc.msg})") from exc
            if not isinstance(rows[-1], dict):
                raise DataError(f"{path}: line {i} should be a JSON object, got {type(rows[-1]).__name__}")
        return rows
    if path.suffix == ".json":
        try:
            rows = json.loads(text or "[]")
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg})") from exc
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
        return rows
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix == ".tsv" else ","))


def records_to_split(records: list[dict], labels: list[str], path: str | Path) -> Split:
    """Map labels (class index or class name) to ids; anything else is an error naming the value."""
    index = {name: i for i, name in enumerate(labels)}
    ids = []
    for i, rec in enumerate(records, 1):
        value = rec["label"]
        if isinstance(value, str) and value in index:
            ids.append(index[value])
            continue
        try:
            k = int(value)
        except (TypeError, ValueError):
            k = -1
        if not (0 <= k < len(labels)) or (isinstance(value, float) and value != k):
            raise DataError(
                f"{path}: row {i} has unknown label {value!r}; expected one of {labels} "
                f"or an index 0..{len(labels) - 1}"
            )
        ids.append(k)
    pairs = [r["text_pair"] for r in records] if records and "text_pair" in records[0] else None
    return Split([r["text"] for r in records], np.array(ids), pairs)


def load_task(
    name: str | None = None,
    *,
    data_dir: str | Path | None = None,
    spec: TaskSpec | None = None,
    spec_file: str | Path | None = None,
    strict: bool = False,
    **overrides: Any,
) -> Task:
    """Build a :class:`Task` from a known name, local files, the bundled demo or the hub.

    ``data_dir`` (or ``$BBFL_DATA_DIR``) holds ``train.*``, optional ``test.*`` and ``labels.json``.
    A name that is not registered needs ``data_dir``; ``spec_file`` (TOML) and ``overrides`` set
    labels, label_words, label_descriptions, template, encoder_template, loss and column names.
    ``label_words`` / ``label_descriptions`` are lists in the order of ``labels`` or tables keyed by
    class name. ``strict`` refuses files with empty texts instead of skipping those rows.
    """
    name = name or "demo"
    fields = _spec_fields(name, spec, spec_file, overrides)
    cols = {
        "text_col": fields.pop("text_col", "text"),
        "pair_col": fields.pop("pair_col", None),
        "label_col": fields.pop("label_col", "label"),
    }
    folder = _resolve_dir(name, data_dir)
    if folder is not None:
        train_rec, test_rec, file_labels = _read_folder(folder, cols, strict)
        source = folder
    elif name == "demo":
        pkg = resources.files("bbfl.data")
        with resources.as_file(pkg / "demo.jsonl") as tr, resources.as_file(pkg / "demo_test.jsonl") as te:
            train_rec, test_rec, file_labels = read_records(tr), read_records(te), None
            source = Path(str(tr)).parent
    elif name in TASKS:
        return _load_from_hub(TASKS[name], fields)
    else:
        raise DataError(f"unknown task {name!r} and no --data-dir; known tasks: {', '.join(TASKS)}")
    given = fields.get("labels") or file_labels
    fields["labels"] = list(given or _infer_labels(train_rec, source))
    _pair_with_labels(fields, source, inferred_by_name=not given and not _are_indices(fields["labels"]))
    defaulted = _fill_defaults(fields)
    _validate(fields, source)
    if defaulted:
        _log.warning(
            "task %r: no %s given (no --spec or a spec without them): using %s; zero-shot and tuned accuracy "
            "depend on them: give a TOML spec (--spec) with template, label_words and label_descriptions",
            name,
            " / ".join(defaulted),
            "; ".join(f"{k} = {fields[k]!r}" for k in defaulted),
        )
    train = records_to_split(train_rec, fields["labels"], source / "train")
    test = records_to_split(test_rec, fields["labels"], source / "test") if test_rec else None
    return Task(name=name, train=train, test=test, columns=cols, defaulted=defaulted, **fields)


def _are_indices(labels: list[str]) -> bool:
    return all(x.lstrip("-").isdigit() for x in labels)


def _pair_with_labels(fields: dict, source: Path, *, inferred_by_name: bool) -> None:
    """Turn label_words / label_descriptions tables into lists in class order; refuse ambiguous lists.

    A list pairs with the classes by position. When the class names were inferred from string labels
    (sorted alphabetically), that order is an accident of the names: TREC's DESC, ENTY, ABBR, ...
    became ABBR, DESC, ... and ABBR got DESC's description. So a list then needs ``labels``.
    """
    labels = fields["labels"]
    for key in ("label_words", "label_descriptions", "causal_label_words"):
        value = fields.get(key)
        if isinstance(value, dict):
            missing = [x for x in labels if x not in value]
            unknown = [x for x in value if x not in labels]
            if missing or unknown:
                raise DataError(
                    f"{source}: the {key} table should name each class {labels} once; "
                    f"missing {missing}, unknown {unknown}"
                )
            fields[key] = [value[x] for x in labels]
        elif value is not None and inferred_by_name:
            raise DataError(
                f"{source}: {key} is a list {value} but no `labels` were given, so the classes were inferred "
                f"from the data in alphabetical order {labels}, which need not be the list's order. Add "
                f"`labels = [...]` in the order of {key} to the spec, or give {key} as a table by class name "
                f'(`[{key}]` then `{labels[0]} = "..."`)'
            )


def _spec_fields(name, spec, spec_file, overrides) -> dict:
    base = spec or TASKS.get(name)
    fields: dict[str, Any] = {}
    if base is not None:
        fields = {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in vars(base).items()
            if k in Task.SPEC_KEYS and v not in ("", ())
        }
        if base.hub_columns.get("text_pair") and "text_pair" in base.hub_columns:
            fields["pair_col"] = "text_pair"
    loaded: dict[str, Any] = {}
    if spec_file is not None:
        path = Path(spec_file)
        if not path.is_file():
            raise DataError(f"{path}: task spec file not found")
        try:
            loaded = tomllib.loads(read_text(path))
        except tomllib.TOMLDecodeError as exc:
            raise DataError(f"{path}: not valid TOML ({exc})") from exc
        unknown = set(loaded) - SPEC_KEYS
        if unknown:
            raise DataError(f"{path}: unknown key(s) {sorted(unknown)}; expected some of {sorted(SPEC_KEYS)}")
    unknown = set(overrides) - SPEC_KEYS
    if unknown:
        raise DataError(f"unknown task option(s) {sorted(unknown)}; expected some of {sorted(SPEC_KEYS)}")
    given = {**loaded, **{k: v for k, v in overrides.items() if v is not None}}
    if {"template", "label_words"} & set(given) and "causal_template" not in given:
        # the user's phrasing wins for every head: the registry's causal phrasing was written for its template
        fields = {k: v for k, v in fields.items() if k not in CAUSAL_KEYS}
    merged = {**fields, **given}
    if given.get("causal_template") == "":  # no causal phrasing (a run recorded before there was one)
        merged = {k: v for k, v in merged.items() if k not in CAUSAL_KEYS}
    return merged


def _resolve_dir(name: str, data_dir) -> Path | None:
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise DataError(f"--data-dir {path}: not a directory")
        return path
    env = os.environ.get("BBFL_DATA_DIR")
    if env:
        for candidate in (Path(env) / name, Path(env)):
            if any((candidate / f"train{s}").is_file() for s in SUFFIXES):
                return candidate
    return None


def _find(folder: Path, stem: str) -> Path | None:
    found = [folder / f"{stem}{s}" for s in SUFFIXES if (folder / f"{stem}{s}").is_file()]
    return found[0] if found else None


def _read_folder(
    folder: Path, cols: dict, strict: bool = False
) -> tuple[list[dict], list[dict] | None, list[str] | None]:
    train = _find(folder, "train")
    if train is None:
        raise DataError(f"{folder}: no train file; expected one of " + ", ".join(f"train{s}" for s in SUFFIXES))
    pair_col = cols["pair_col"]
    if pair_col == "text_pair" and train.suffix == ".jsonl":
        with train.open(encoding="utf-8-sig", errors="replace") as f:  # bad bytes are named by read_records
            first = f.readline()
        try:
            pair_col = pair_col if "text_pair" in json.loads(first or "{}") else None
        except json.JSONDecodeError:
            pass  # read_records names the line
    kw = dict(text_col=cols["text_col"], pair_col=pair_col, label_col=cols["label_col"], strict=strict)
    test = _find(folder, "test")
    labels_file = folder / "labels.json"
    labels = None
    if labels_file.is_file():
        try:
            labels = json.loads(read_text(labels_file))
        except json.JSONDecodeError as exc:
            raise DataError(f"{labels_file}: not valid JSON ({exc.msg}); expected a list of class names") from exc
        if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
            raise DataError(f"{labels_file}: expected a JSON list of class names, got {labels!r}")
    return read_records(train, **kw), (read_records(test, **kw) if test else None), labels


def _infer_labels(records: list[dict], source: Path) -> list[str]:
    values = {r["label"] for r in records}
    if all(isinstance(v, str) and not v.lstrip("-").isdigit() for v in values):
        return sorted(values)
    try:
        n = max(int(v) for v in values) + 1
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{source}: cannot infer class names from labels {sorted(map(str, values))[:10]}; give `labels` in a spec"
        ) from exc
    return [str(i) for i in range(n)]


def _fill_defaults(fields: dict) -> list[str]:
    """Fill what the spec left out; returns the keys whose defaults change what the model reads."""
    defaulted = [k for k in ("template", "label_words", "label_descriptions") if k not in fields]
    fields.setdefault("label_words", list(fields["labels"]))
    fields.setdefault("label_descriptions", list(fields["labels"]))
    fields.setdefault("template", DEFAULT_TEMPLATE)
    fields.setdefault("encoder_template", "{text}")
    fields.setdefault("loss", "ce")
    return defaulted


def _validate(fields: dict, source: Path) -> None:
    n = len(fields["labels"])
    for key in ("labels", "label_words", "label_descriptions"):
        value = fields[key]
        if not isinstance(value, list) or not all(isinstance(x, str) and x.strip() for x in value):
            raise DataError(f"{source}: {key} should be a list of non-empty strings, got {value!r}")
        if len(value) != n:
            raise DataError(
                f"{source}: {key} has {len(fields[key])} entries {fields[key]} but there are {n} "
                f"classes {fields['labels']}"
            )
    if "{text}" not in fields["template"] or "{mask}" not in fields["template"]:
        raise DataError(f"template {fields['template']!r} must contain {{text}} and {{mask}}")
    if "{text}" not in fields["encoder_template"]:
        raise DataError(f"encoder_template {fields['encoder_template']!r} must contain {{text}}")
    if fields["loss"] not in ("ce", "hinge"):
        raise DataError(f"loss {fields['loss']!r} must be 'ce' or 'hinge'")
    causal = fields.get("causal_template", "")
    if causal and ("{text}" not in causal or "{mask}" not in causal):
        raise DataError(f"{source}: causal_template {causal!r} must contain {{text}} and {{mask}}")
    words = fields.get("causal_label_words", [])
    if words and (
        not isinstance(words, list) or len(words) != n or not all(isinstance(x, str) and x.strip() for x in words)
    ):
        raise DataError(f"{source}: causal_label_words should be {n} non-empty strings (one per class), got {words!r}")
    if words and not causal:
        raise DataError(f"{source}: causal_label_words {words!r} given without a causal_template")


def _load_from_hub(spec: TaskSpec, fields: dict) -> Task:
    """Load a registered task through `datasets` (needs the `hub` extra and a network)."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"task {spec.name!r}: no --data-dir given and `datasets` is not installed "
            "(pip install 'bbfl[hub]'), so it cannot be downloaded"
        ) from exc
    try:
        ds = datasets.load_dataset(*spec.hub)
    except Exception as exc:  # network / hub errors come in many types
        raise DataError(
            f"task {spec.name!r}: could not load {spec.hub} from the hub ({exc}); pass --data-dir with local files"
        ) from exc
    c = spec.hub_columns

    def to_split(part) -> Split:
        pairs = list(part[c["text_pair"]]) if "text_pair" in c else None
        return Split(list(part[c["text"]]), np.array(part[c["label"]]), pairs)

    fields = {k: v for k, v in fields.items() if k not in ("text_col", "pair_col", "label_col")}
    _pair_with_labels(fields, Path(spec.name), inferred_by_name=False)
    return Task(name=spec.name, train=to_split(ds["train"]), test=to_split(ds[spec.hub_test_split]), **fields)
