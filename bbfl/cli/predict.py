"""`bbfl predict` and `bbfl export`: use a finished run's result on new texts, or hand it to PEFT."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress

from bbfl.cli._app import MODEL, app, fail, progress_bar
from bbfl.exceptions import BBFLError, DataError

OUTPUT_FORMATS = ("jsonl", "csv")


def read_inputs(
    path: str, text_col: str = "text", pair_col: str | None = None
) -> tuple[list[str], list[str] | None, list | None]:
    """(texts, text pairs or None, gold labels or None) from a jsonl/json/csv/tsv file, or stdin (``-``).

    Stdin is one text per line. A file's label column, when every row has one, is kept for an accuracy.
    """
    if path == "-":
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not texts:
            raise DataError("stdin held no text lines")
        return texts, None, None
    from bbfl.data.loaders import SUFFIXES, _read_rows

    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: no such file")
    if file.suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown file type {file.suffix!r}; expected one of {', '.join(SUFFIXES)}")
    rows = _read_rows(file)
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected one object (a row with a {text_col!r} field) per record")
    if text_col not in rows[0]:
        raise DataError(f"{path}: no {text_col!r} column (--text-col); columns found: {sorted(rows[0])}")
    texts = [r.get(text_col) for r in rows]
    bad = [i for i, t in enumerate(texts, 1) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise DataError(f"{path}: {len(bad)} row(s) have an empty or non-text {text_col!r}, first rows {bad[:5]}")
    pairs = [str(r.get(pair_col) or "") for r in rows] if pair_col else None
    gold = [r["label"] for r in rows] if all("label" in r and r["label"] not in (None, "") for r in rows) else None
    return texts, pairs, gold


def gold_indices(gold: list, labels: list[str], path: str) -> np.ndarray:
    from bbfl.data.loaders import records_to_split

    records = [{"text": "", "label": g} for g in gold]
    return records_to_split(records, labels, path).labels


def format_predictions(texts: list[str], labels: list[str], pred: np.ndarray, probs: np.ndarray, fmt: str) -> str:
    """jsonl: one object per text; csv: text, prediction, one ``p_<class>`` column per class."""
    if fmt == "jsonl":
        lines = [
            json.dumps(
                {
                    "text": t,
                    "prediction": labels[int(k)],
                    "probabilities": {c: round(float(p), 6) for c, p in zip(labels, row)},
                },
                ensure_ascii=False,
            )
            for t, k, row in zip(texts, pred, probs)
        ]
        return "".join(line + "\n" for line in lines)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["text", "prediction", *(f"p_{c}" for c in labels)])
    for t, k, row in zip(texts, pred, probs):
        writer.writerow([t, labels[int(k)], *(f"{float(p):.6f}" for p in row)])
    return buf.getvalue()


@app.command()
def predict(
    run_dir: str = typer.Argument(..., help="A finished run directory (bbt, fedbpt, fwdllm, fedkseed, zoopfl)."),
    input: str = typer.Option(
        "-", "--input", "-i", help="jsonl/json/csv/tsv file with a text column, or - (stdin, one text a line)."
    ),
    output: str | None = typer.Option(None, "--output", "-o", help="Write here (.jsonl or .csv); default stdout."),
    fmt: str | None = typer.Option(
        None, "--format", help="jsonl or csv (default: from --output's suffix, else jsonl)."
    ),
    text_col: str = typer.Option("text", help="Column holding the text."),
    pair_col: str | None = typer.Option(None, help="Column holding the second text of pair tasks."),
    batch_size: int = typer.Option(256, help="Texts per black-box call."),
    model: str | None = MODEL,
    data_dir: str | None = typer.Option(None, help="The run's task folder, if not where config.json says."),
    client: int | None = typer.Option(None, help="ZooPFL: this client's private surgery and re-mapping."),
) -> None:
    """Classify texts with a run's result: predicted label and every class's probability."""
    from bbfl.predict import Predictor

    err = Console(stderr=True)
    fmt = fmt or (Path(output).suffix.lstrip(".") if output else "jsonl")
    try:
        if fmt not in OUTPUT_FORMATS:
            raise DataError(f"unknown output format {fmt!r}; expected one of {', '.join(OUTPUT_FORMATS)}")
        texts, pairs, gold = read_inputs(input, text_col, pair_col)
        predictor = Predictor(run_dir, model=model, data_dir=data_dir, client=client)
        with Progress(*progress_bar().columns, console=err) as progress:  # stdout may carry the predictions
            bar = progress.add_task("predict", total=len(texts))
            pred, probs = predictor.predict(
                texts, pairs, batch_size=batch_size, on_batch=lambda n: progress.advance(bar, n)
            )
        text = format_predictions(texts, predictor.labels, pred, probs, fmt)
        if output:
            from bbfl.io import atomic_write_bytes

            atomic_write_bytes(output, text.encode())
        else:
            sys.stdout.write(text)
        err.print(f"{len(texts)} texts classified by {predictor.method} run {run_dir}")
        if gold is not None:
            y = gold_indices(gold, predictor.labels, input)
            err.print(f"accuracy against the file's labels: {float((pred == y).mean()):.4f}")
    except BBFLError as exc:
        fail(exc)


@app.command()
def export(
    run_dir: str = typer.Argument(..., help="A finished run directory."),
    out_dir: str = typer.Argument(..., help="Folder for adapter_config.json + adapter_model.safetensors."),
) -> None:
    """Export a run's result as a Hugging Face PEFT adapter (soft prompt -> prompt tuning, LoRA -> LoRA)."""
    from bbfl.export import export_run

    try:
        path, kind = export_run(run_dir, out_dir)
    except BBFLError as exc:
        fail(exc)
    Console(stderr=True).print(f"exported {kind} to {path}")
