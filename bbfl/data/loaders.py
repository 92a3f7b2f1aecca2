"""Loading tasks from local files (jsonl/json/csv/tsv), the bundled demo, or the `datasets` hub."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from bbfl.data.registry import PAIR_ENCODER_TEMPLATE, PAIR_TEMPLATE, TASKS, TaskSpec, get_spec
from bbfl.data.task import Split, Task
from bbfl.exceptions import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
PROMPT_KEYS = ("labels", "label_words", "label_descriptions", "template", "encoder_template", "loss")
COLUMN_KEYS = ("text_col", "pair_col", "label_col")
SPEC_KEYS = frozenset(PROMPT_KEYS + COLUMN_KEYS + ("description",))
CUSTOM_TEMPLATE = "{text} . {mask} ."
ENV_VAR = "BBFL_DATA_DIR"


# --------------------------------------------------------------------------- files -> records


def read_records(
    path: str | Path, *, text_col: str = "text", pair_col: str | None = None, label_col: str = "label"
) -> list[dict]:
    """Read one data file into ``{"text", "label"[, "text_pair"]}`` dicts.

    Parameters
    ----------
    path : str or Path
        A ``.jsonl`` (one object per line), ``.json`` (a list of objects), ``.csv`` or ``.tsv``
        file; csv/tsv need a header row naming the columns.
    text_col, pair_col, label_col : str
        Column names of the text, the optional second sentence and the label.

    Returns
    -------
    list of dict
        One record per row; labels are kept as read (int, or str from csv/tsv).

    Raises
    ------
    DataError
        Naming the file and what was expected: missing or empty file, unknown suffix, a row that
        is not valid JSON, a missing column (with the columns found) or an empty text.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}")
    wanted = [text_col, *([pair_col] if pair_col else []), label_col]
    records = [_to_record(path, where, row, wanted) for where, row in _iter_rows(path)]
    if not records:
        raise DataError(
            f"{path}: no rows (the file is empty or has only a header); expected labelled examples"
        )
    return records


def _to_record(path: Path, where: str, row: dict, wanted: list[str]) -> dict:
    missing = [c for c in wanted if c not in row]
    if missing:
        found = sorted(str(k) for k in row if k is not None)
        raise DataError(f"{path}: {where} is missing column(s) {missing}; columns found: {found}")
    text_col, *pair, label_col = wanted
    rec = {"text": _text(path, where, text_col, row[text_col]), "label": row[label_col]}
    if pair:
        rec["text_pair"] = _text(path, where, pair[0], row[pair[0]])
    if rec["label"] is None or (isinstance(rec["label"], str) and not rec["label"].strip()):
        raise DataError(f"{path}: {where} has an empty {label_col!r}: {rec['label']!r}")
    return rec


def _text(path: Path, where: str, col: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}: {where} has an empty or non-text {col!r}: {value!r}")
    return value


def _iter_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield ``(location, row)``; the location ("line 7", "item 3") goes into error messages."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    else:
        yield from _iter_delimited(path, "\t" if suffix == ".tsv" else ",")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {i} is not valid JSON ({exc.msg}): {line.strip()[:80]!r}"
                ) from exc
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}: line {i} should be a JSON object, got {type(row).__name__}: {row!r}"
                )
            yield f"line {i}", row


def _iter_json(path: Path) -> Iterator[tuple[str, dict]]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {i} should be a JSON object, got {type(row).__name__}: {row!r}")
        yield f"item {i}", row


def _iter_delimited(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    # TSV files in NLP (GLUE, LM-BFF) are unquoted and contain stray '"'; csv's quoting would merge rows.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # utf-8-sig: spreadsheet exports (and GLUE's MRPC) start with a byte-order mark.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        for row in reader:
            yield f"line {reader.line_num}", row


# --------------------------------------------------------------------------- records -> Split


def records_to_split(records: list[dict], labels: list[str], path: str | Path) -> Split:
    """Turn records into a :class:`Split`, mapping each label to its class id.

    Parameters
    ----------
    records : list of dict
        As returned by :func:`read_records`.
    labels : list of str
        Class names. A record's label may be a class id ``0..C-1`` (int, or an integer string as
        csv gives) or a class name; a string that is a class name wins over reading it as an id.
    path : str or Path
        Where the records came from, for error messages.

    Returns
    -------
    Split

    Raises
    ------
    DataError
        For a label that is neither, naming the file, the row, the value and the allowed ones.
    """
    index = {name: i for i, name in enumerate(labels)}
    ids = [_label_id(v["label"], index, len(labels), path, row) for row, v in enumerate(records, 1)]
    has_pairs = bool(records) and "text_pair" in records[0]
    pairs = [r["text_pair"] for r in records] if has_pairs else None
    return Split([r["text"] for r in records], np.array(ids, dtype=np.int64), pairs)


def _label_id(value: Any, index: dict[str, int], n: int, path: str | Path, row: int) -> int:
    if isinstance(value, str):
        if value in index or value.strip() in index:
            return index[value if value in index else value.strip()]
        k = _as_int(value.strip())
    elif isinstance(value, bool):  # bool is an int subclass; True is no class id
        k = None
    elif isinstance(value, int | float | np.integer):
        k = int(value) if float(value).is_integer() else None
    else:
        k = None
    if k is None or not 0 <= k < n:
        raise DataError(
            f"{path}: row {row} has unknown label {value!r}; expected a class name {list(index)} "
            f"or a class id 0..{n - 1}"
        )
    return k


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


# --------------------------------------------------------------------------- load_task


def load_task(
    name: str | None = None,
    *,
    data_dir: str | Path | None = None,
    spec: TaskSpec | None = None,
    spec_file: str | Path | None = None,
    **spec_overrides: Any,
) -> Task:
    """Build a :class:`Task` from local files, the bundled demo or the `datasets` hub.

    Data are looked for, in order: ``data_dir``; ``$BBFL_DATA_DIR/<name>``; ``$BBFL_DATA_DIR``
    itself if it holds a train file (not for ``demo``); the packaged files for ``demo``; the
    `datasets` hub for registered tasks. A data folder holds ``train.{jsonl,json,csv,tsv}``,
    optionally ``test.*`` and ``labels.json`` (class names, indexed by integer labels).

    Parameters
    ----------
    name : str, optional
        A registered task (see :func:`bbfl.data.list_tasks`) or any name for custom data.
        Defaults to the data folder's name, or ``"demo"`` without one.
    data_dir : str or Path, optional
        Folder with the task's files.
    spec : TaskSpec, optional
        Use this spec instead of the registry's entry for ``name``.
    spec_file : str or Path, optional
        TOML file with any of ``labels``, ``label_words``, ``label_descriptions``, ``template``,
        ``encoder_template``, ``loss``, ``text_col``, ``pair_col``, ``label_col``, ``description``.
    **spec_overrides
        The same keys (e.g. from CLI flags); ``None`` values are ignored. They win over
        ``spec_file``, which wins over the registered spec.

    Returns
    -------
    Task
        For custom data without ``labels``, the class names are inferred from the data;
        ``label_words`` and ``label_descriptions`` then default to the class names.

    Raises
    ------
    DataError
        For unknown tasks, unreadable or malformed files, inconsistent specs, or a hub download
        that is impossible (then pass ``data_dir``).
    """
    folder = _resolve_dir(name, data_dir)
    name = name or (folder.name if folder is not None else "demo")
    base = spec if spec is not None else TASKS.get(name)
    fields = _base_fields(base)
    fields.update(_read_spec_file(spec_file) if spec_file is not None else {})
    fields.update(_check_overrides(spec_overrides))
    origin = f"task {name!r}" + (f" (spec {spec_file})" if spec_file is not None else "")
    if folder is not None:
        return _task_from_files(name, _files_in(folder), fields, folder, origin)
    if name == "demo" and spec is None:
        pkg = resources.files("bbfl.data")
        with (
            resources.as_file(pkg / "demo.jsonl") as train,
            resources.as_file(pkg / "demo_test.jsonl") as test,
        ):
            return _task_from_files(name, (Path(train), Path(test), None), fields, Path(train).parent, origin)
    if base is None:
        get_spec(name)  # raises, listing the known tasks
    return _task_from_hub(name, base, fields, origin)


def _base_fields(base: TaskSpec | None) -> dict[str, Any]:
    if base is None:
        return {}
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(base).items() if k in PROMPT_KEYS}
    fields["description"] = base.description
    # The shared/normalised files name the second sentence `text_pair`.
    fields["pair_col"] = "text_pair" if base.is_pair else None
    return fields


def _read_spec_file(spec_file: str | Path) -> dict[str, Any]:
    path = Path(spec_file)
    if not path.is_file():
        raise DataError(f"{path}: task spec file not found")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        loaded = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{path}: not valid TOML ({exc})") from exc
    unknown = sorted(set(loaded) - SPEC_KEYS)
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown}; expected some of {sorted(SPEC_KEYS)}")
    return loaded


def _check_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - SPEC_KEYS)
    if unknown:
        raise DataError(f"unknown task option(s) {unknown}; expected some of {sorted(SPEC_KEYS)}")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items() if v is not None}


def _resolve_dir(name: str | None, data_dir: str | Path | None) -> Path | None:
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise DataError(f"data dir {str(path)!r}: not a directory")
        return path
    env = os.environ.get(ENV_VAR)
    if not env:
        return None
    root = Path(env)
    if name and (root / name).is_dir():
        return root / name
    # A flat $BBFL_DATA_DIR is one dataset; the packaged demo must not be shadowed by it.
    if name != "demo" and any((root / f"train{s}").is_file() for s in SUFFIXES):
        return root
    return None


def _files_in(folder: Path) -> tuple[Path, Path | None, Path | None]:
    train = _find(folder, "train")
    if train is None:
        odd = sorted(p.name for p in folder.glob("train.*"))
        hint = f" (found {odd}, whose type is not supported)" if odd else ""
        expected = ", ".join(f"train{s}" for s in SUFFIXES)
        raise DataError(f"{folder}: no train file{hint}; expected one of {expected}")
    labels = folder / "labels.json"
    return train, _find(folder, "test"), labels if labels.is_file() else None


def _find(folder: Path, stem: str) -> Path | None:
    found = [folder / f"{stem}{s}" for s in SUFFIXES if (folder / f"{stem}{s}").is_file()]
    if len(found) > 1:
        raise DataError(f"{folder}: several {stem} files {[p.name for p in found]}; keep only one")
    return found[0] if found else None


def _task_from_files(
    name: str,
    files: tuple[Path, Path | None, Path | None],
    fields: dict[str, Any],
    source: Path,
    origin: str,
) -> Task:
    train_file, test_file, labels_file = files
    cols = {k: fields.pop(k, None) for k in COLUMN_KEYS}
    kw = dict(
        text_col=cols["text_col"] or "text", pair_col=cols["pair_col"], label_col=cols["label_col"] or "label"
    )
    train_rec = read_records(train_file, **kw)
    test_rec = read_records(test_file, **kw) if test_file is not None else None
    file_labels = _read_labels_json(labels_file) if labels_file is not None else None
    if "labels" in fields:
        if file_labels is not None:
            _check_labels_agree(fields["labels"], file_labels, labels_file)
    elif file_labels is not None:
        fields["labels"] = file_labels
    else:
        fields["labels"] = _infer_labels(train_rec + (test_rec or []), train_file)
    fields = _complete(fields, is_pair=cols["pair_col"] is not None, source=source, origin=origin)
    train = records_to_split(train_rec, fields["labels"], train_file)
    test = records_to_split(test_rec, fields["labels"], test_file) if test_rec is not None else None
    return Task(name=name, train=train, test=test, **fields)


def _read_labels_json(path: Path) -> list[str]:
    try:
        labels = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}); expected a list of class names") from exc
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) and x for x in labels)):
        raise DataError(f"{path}: expected a JSON list of class names, got {labels!r}")
    return labels


def _check_labels_agree(labels: list[str], file_labels: list[str], path: Path) -> None:
    # labels.json fixes what integer labels mean: a spec may rename the classes but not reorder them.
    same_names_other_order = sorted(labels) == sorted(file_labels) and labels != file_labels
    if len(labels) != len(file_labels) or same_names_other_order:
        raise DataError(f"{path}: class names {file_labels} disagree with the task's labels {labels}")


def _infer_labels(records: list[dict], source: Path) -> list[str]:
    """Class names for data without a label list, then convert the records' labels to those names."""
    keys = [_label_key(r["label"]) for r in records]
    unique = set(keys)
    numeric = all(_as_int(k) is not None for k in unique)
    if numeric and {_as_int(k) for k in unique} == set(range(len(unique))):
        names = [str(i) for i in range(len(unique))]  # ids 0..C-1: keep them as they are
    else:
        names = sorted(unique, key=_as_int) if numeric else sorted(unique)
    for rec, key in zip(records, keys):
        rec["label"] = key  # matched by name in records_to_split, e.g. star ratings 1..5 -> ids 0..4
    if len(names) < 2:
        raise DataError(f"{source}: found only the label(s) {names}; a classification task needs two or more")
    return names


def _label_key(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _complete(fields: dict[str, Any], *, is_pair: bool, source: Path | str, origin: str) -> dict[str, Any]:
    """Fill the defaults of a custom task and validate every prompt field."""
    fields = dict(fields)
    labels = fields["labels"]
    fields.setdefault("label_words", list(labels))
    fields.setdefault("label_descriptions", list(labels))
    fields.setdefault("template", PAIR_TEMPLATE if is_pair else CUSTOM_TEMPLATE)
    fields.setdefault("encoder_template", PAIR_ENCODER_TEMPLATE if is_pair else "{text}")
    fields.setdefault("loss", "ce")
    fields.setdefault("description", f"custom task from {source}")
    try:
        _validate(fields, is_pair)
    except DataError as exc:  # say where the bad value came from
        raise DataError(f"{origin}: {exc}") from None
    return {k: fields[k] for k in (*PROMPT_KEYS, "description")}


def _validate(fields: dict[str, Any], is_pair: bool) -> None:
    for key in ("labels", "label_words", "label_descriptions"):
        value = fields[key]
        if not (isinstance(value, list) and all(isinstance(x, str) and x.strip() for x in value)):
            raise DataError(f"{key} must be a list of non-empty strings, got {value!r}")
    if len(set(fields["labels"])) != len(fields["labels"]):
        raise DataError(f"labels must be distinct, got {fields['labels']}")
    n = len(fields["labels"])
    for key in ("label_words", "label_descriptions"):
        if len(fields[key]) != n:
            raise DataError(
                f"{key} has {len(fields[key])} entries {fields[key]} "
                f"but there are {n} classes {fields['labels']}"
            )
    _validate_template("template", fields["template"], is_pair, needs_mask=True)
    _validate_template("encoder_template", fields["encoder_template"], is_pair, needs_mask=False)
    if fields["loss"] not in ("ce", "hinge"):
        raise DataError(f"loss must be 'ce' or 'hinge', got {fields['loss']!r}")


def _validate_template(key: str, template: Any, is_pair: bool, *, needs_mask: bool) -> None:
    needed = ["{text}", *(["{mask}"] if needs_mask else []), *(["{text_pair}"] if is_pair else [])]
    if not isinstance(template, str) or any(p not in template for p in needed):
        raise DataError(f"{key} {template!r} must contain {' and '.join(needed)}")
    if not is_pair and "{text_pair}" in template:
        raise DataError(
            f"{key} {template!r} uses {{text_pair}} but the data have no pair column (set pair_col)"
        )


# --------------------------------------------------------------------------- hub


def _task_from_hub(name: str, spec: TaskSpec, fields: dict[str, Any], origin: str) -> Task:
    """Download a registered task with `datasets` (the optional ``hub`` extra, needs a network)."""
    where = f"task {name!r}: no local data (no --data-dir, and ${ENV_VAR} unset or without a {name}/ folder)"
    if spec.hub_name is None:
        raise DataError(f"{where} and it is not on the datasets hub; pass --data-dir with its files")
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"{where} and the `datasets` package is not installed to download it; pass --data-dir DIR "
            "with train/test files (jsonl/csv/tsv), or pip install 'bbfl[hub]'"
        ) from exc
    try:
        ds = datasets.load_dataset(spec.hub_name, spec.hub_config)
    except Exception as exc:  # offline, unknown id, hub errors: many exception types
        hub_id = spec.hub_name + (f"/{spec.hub_config}" if spec.hub_config else "")
        raise DataError(
            f"{where} and downloading {hub_id!r} failed ({exc}); pass --data-dir DIR instead"
        ) from exc
    for key in COLUMN_KEYS:
        fields.pop(key, None)
    fields = _complete(fields, is_pair=spec.hub_pair_col is not None, source=spec.hub_name, origin=origin)
    n = len(fields["labels"])
    test = _hub_split(ds[spec.hub_test_split], spec, n) if spec.hub_test_split in ds else None
    return Task(name=name, train=_hub_split(ds["train"], spec, n), test=test, **fields)


def _hub_split(part: Any, spec: TaskSpec, num_classes: int) -> Split:
    labels = np.asarray(part[spec.hub_label_col], dtype=np.int64)
    keep = np.flatnonzero((labels >= 0) & (labels < num_classes))  # SNLI marks "no gold label" as -1
    texts = list(part[spec.hub_text_col])
    pairs = list(part[spec.hub_pair_col]) if spec.hub_pair_col else None
    return Split(texts, labels, pairs).subset(keep)
