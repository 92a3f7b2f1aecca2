"""Line several runs up: one table, accuracy-vs-cost plots and a self-contained HTML page.

``bbfl compare RUN...`` reads each run directory (``config.json``, ``summary.json``,
``metrics.jsonl``; nothing is unpickled, nothing is re-run), groups runs whose configurations differ
only in their seeds, and reports per group: method, model, task, seeds, test accuracy mean ± std,
training queries, bytes up/down per client-round, peak memory and time.

What each column means, whatever the method wrote:

* accuracy - the method's final test accuracy (``summary.json``'s ``test_accuracy``, or the
  summary row named after the method); ``zero-shot`` the no-prompt row where the run has one.
* queries - training queries (BBT's unit: one candidate scored on one batch).
* bytes - per client and round, as the engine measured the serialised messages (federated runs).
* time - the run's own measured seconds (rows' ``seconds`` or the rounds' ``seconds``).

>>> _group_key({"method": "bbt", "bbt": {"seed": 1, "budget": 40}, "sizes": {"train": 8}})
'{"bbt": {"budget": 40}, "method": "bbt"}'
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bbfl.exceptions import ConfigError

# config keys that differ between seeds of one configuration (or are derived from the seed's draw)
SEED_KEYS = frozenset({"seed", "client_sizes", "sizes", "test_rows", "test_indices"})
# the summary row that holds a method's own result, where a summary has rows instead of test_accuracy
ROW_OF_METHOD = {"bbt": "bbt", "bdpl": "bdpl", "fedone": "fedone"}


@dataclass
class RunResult:
    """One run directory, reduced to the numbers a comparison needs (None where the run has none)."""

    path: Path
    method: str
    model: str
    task: str
    seed: int | None
    group: str
    finished: bool
    accuracy: float | None = None
    zero_shot: float | None = None
    queries: float | None = None
    bytes_up: float | None = None
    bytes_down: float | None = None
    peak_memory_mb: float | None = None
    seconds: float | None = None
    # (training queries, cumulative bytes, test accuracy) after each evaluation on the test split
    curve: list[tuple[float, float, float]] = field(default_factory=list)


@dataclass
class Group:
    """Runs of one configuration (seeds differ)."""

    label: str
    runs: list[RunResult]

    def column(self, name: str) -> list[float]:
        values = [getattr(r, name) for r in self.runs]
        return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]

    def mean(self, name: str) -> float | None:
        values = self.column(name)
        return statistics.fmean(values) if values else None

    def std(self, name: str) -> float | None:
        values = self.column(name)
        return statistics.stdev(values) if len(values) >= 2 else None

    def row(self) -> dict[str, Any]:
        first = self.runs[0]
        seeds = sorted({r.seed for r in self.runs if r.seed is not None})
        acc, sd = self.mean("accuracy"), self.std("accuracy")
        return {
            "group": self.label,
            "method": first.method,
            "model": first.model,
            "task": first.task,
            "runs": len(self.runs),
            "seeds": ",".join(map(str, seeds)) or "-",
            "accuracy_mean": acc,
            "accuracy_std": sd,
            "zero_shot_mean": self.mean("zero_shot"),
            "queries": self.mean("queries"),
            "bytes_up_per_client_round": self.mean("bytes_up"),
            "bytes_down_per_client_round": self.mean("bytes_down"),
            "peak_memory_mb": max(self.column("peak_memory_mb"), default=None),
            "seconds_mean": self.mean("seconds"),
            "unfinished": sum(not r.finished for r in self.runs),
        }

    def mean_curve(self) -> list[tuple[float, float, float]]:
        """Point-wise mean over the runs' curves, cut to the shortest (seeds of one config share a schedule)."""
        curves = [r.curve for r in self.runs if r.curve]
        if not curves:
            return []
        n = min(len(c) for c in curves)
        return [tuple(statistics.fmean(c[i][k] for c in curves) for k in range(3)) for i in range(n)]


# ------------------------------------------------------------------------------------------ reading runs
def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories named directly, or found one level below a folder of runs (``runs/``)."""
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if (path / "config.json").is_file():
            found.append(path)
        elif path.is_dir():
            children = sorted(p for p in path.iterdir() if (p / "config.json").is_file())
            if not children:
                raise ConfigError(f"{str(path)!r} is neither a run directory (no config.json) nor a folder of runs")
            found += children
        else:
            raise ConfigError(f"run directory {str(path)!r} does not exist")
    return list(dict.fromkeys(found))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; a line cut short by a crash is skipped (it is the last one)."""
    file = path / "metrics.jsonl"
    if not file.is_file():
        return []
    records = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _strip_seeds(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_seeds(v) for k, v in obj.items() if k not in SEED_KEYS}
    if isinstance(obj, list):
        return [_strip_seeds(v) for v in obj]
    return obj


def _group_key(config: dict) -> str:
    return json.dumps(_strip_seeds(config), sort_keys=True, default=str)


def _seed(config: dict) -> int | None:
    method = config.get("method")
    for section in (config.get(method) if isinstance(method, str) else None, config.get("engine"), config):
        if isinstance(section, dict) and isinstance(section.get("seed"), int):
            return section["seed"]
    return None


def _model_name(config: dict) -> str:
    box = config.get("blackbox") or {}
    # the embedded default is recorded as None plus its name (portable run directories)
    name = box.get("model") or box.get("model_name") or box.get("base_url") or box.get("api_model") or "?"
    name = str(name)
    # an embedded model is recorded as a site-packages path in older runs: show its package's name
    return name.split("site-packages/")[-1].split("/")[0] if "site-packages/" in name else name


def _row(summary: dict, name: str) -> dict | None:
    for row in summary.get("rows") or []:
        if isinstance(row, dict) and row.get("method") == name:
            return row
    return None


def _zero_shot(method: str, summary: dict, records: list[dict]) -> float | None:
    if _number(summary.get("zero_shot_test_accuracy")) is not None:  # FedBPT: besides round 0's start prompt
        return _number(summary.get("zero_shot_test_accuracy"))
    if method in ("fwdllm", "fedkseed") and summary.get("peft") != "prompt":
        # round 0 is the untouched model (LoRA B = 0, zero deltas), i.e. zero-shot; a soft prompt's is not
        return _number(summary.get("start_test_accuracy"))
    for row in summary.get("rows") or []:
        if isinstance(row, dict) and str(row.get("method", "")).startswith("zero-shot"):
            return _number(row.get("test_acc"))
    for record in records:
        if record.get("phase") == "zero-shot":
            return _number(record.get("test_accuracy"))
    return None


def _curve(method: str, summary: dict, records: list[dict], final: float | None, queries: float | None):
    """Test accuracy after each evaluation: every round of a federated run; start and end of BBT/BDPL."""
    rounds = [r for r in records if r.get("phase") == "round"]
    if rounds:
        points, spent = [], 0.0
        for r in rounds:
            spent += _number(r.get("bytes_total")) or 0.0
            acc, q = _number(r.get("test_accuracy")), _number(r.get("train_queries"))
            if acc is not None and q is not None:
                points.append((q, spent, acc))
        return points
    start = (
        _row(summary, f"{method} start (z=0)") or _row(summary, "zero-shot") or _row(summary, "zero-shot (no prompt)")
    )
    begin = _number(start.get("test_acc")) if start else None
    if final is None or queries is None:
        return []
    return ([(0.0, 0.0, begin)] if begin is not None else []) + [(queries, 0.0, final)]


def read_run(path: str | Path) -> RunResult:
    """Reduce one run directory to a :class:`RunResult` (an unfinished run reports its last round)."""
    path = Path(path)
    config = _read_json(path / "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("method"), str):
        raise ConfigError(f"{path / 'config.json'} has no 'method': not a bbfl run directory")
    method = config["method"]
    summary_file = path / "summary.json"
    summary = _read_json(summary_file) if summary_file.is_file() else {}
    summary = summary if isinstance(summary, dict) else {}
    records = _metrics(path)
    rounds = [r for r in records if r.get("phase") == "round"]
    own = _row(summary, ROW_OF_METHOD.get(method, method)) or {}

    accuracy = _number(summary.get("test_accuracy"))
    if accuracy is None:
        accuracy = _number(own.get("test_acc"))
    if accuracy is None and rounds:
        accuracy = _number(rounds[-1].get("test_accuracy"))
    queries = _number(summary.get("train_queries"))
    if queries is None:
        queries = _number(own.get("train_queries"))
    if queries is None and rounds:
        queries = _number(rounds[-1].get("train_queries"))
    up = _number(summary.get("bytes_up_per_client_round"))
    down = _number(summary.get("bytes_down_per_client_round"))
    if up is None and len(rounds) > 1:  # round 0 is the starting evaluation: no messages
        up, down = _number(rounds[-1].get("bytes_up_per_client")), _number(rounds[-1].get("bytes_down_per_client"))
    memory = [_number(r.get("cpu_peak_rss_mb")) for r in [summary, *records]]
    memory = [m for m in memory if m is not None]
    row_seconds = [_number(r.get("seconds")) for r in summary.get("rows") or [] if isinstance(r, dict)]
    round_seconds = [_number(r.get("seconds")) for r in rounds]
    seconds = [s for s in (row_seconds or round_seconds) if s is not None]
    return RunResult(
        path=path,
        method=method,
        model=_model_name(config),
        task=str(summary.get("task") or (config.get("data") or {}).get("task") or "?"),
        seed=_seed(config),
        group=_group_key(config),
        finished=bool(summary),
        accuracy=accuracy,
        zero_shot=_zero_shot(method, summary, records),
        queries=queries,
        bytes_up=up,
        bytes_down=down,
        peak_memory_mb=max(memory) if memory else None,
        seconds=sum(seconds) if seconds else None,
        curve=_curve(method, summary, records, accuracy, queries),
    )


# ------------------------------------------------------------------------------------------ grouping
def _differences(configs: Sequence[dict]) -> list[dict[str, Any]]:
    """Per config, the flattened settings whose values are not the same in every config."""
    flat = [_flatten(_strip_seeds(c)) for c in configs]
    keys = sorted({k for f in flat for k in f})
    varying = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]
    return [{k: f.get(k) for k in varying} for f in flat]


def _flatten(obj: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def group_runs(results: Sequence[RunResult]) -> list[Group]:
    """Runs grouped by configuration (seeds aside), labelled by the method and the settings that differ
    between configurations of that method."""
    by_key: dict[str, list[RunResult]] = {}
    for result in results:
        by_key.setdefault(result.group, []).append(result)
    groups = [
        Group(label="", runs=sorted(runs, key=lambda r: (r.seed is None, r.seed or 0))) for runs in by_key.values()
    ]
    for method in dict.fromkeys(g.runs[0].method for g in groups):
        same = [g for g in groups if g.runs[0].method == method]
        diffs = _differences([json.loads(g.runs[0].group) for g in same])
        for group, diff in zip(same, diffs):
            shown = {k.split(".")[-1]: v for k, v in diff.items()}
            detail = ", ".join(f"{k}={v}" for k, v in list(shown.items())[:4])
            group.label = method + (f" ({detail})" if detail else "")
    return groups


# ------------------------------------------------------------------------------------------ output
def table_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One display row per group: accuracy as 'mean ± std' (std over seeds; '-' with one run)."""
    rows = []
    shared = shared_fields(groups)
    for group in groups:
        row = group.row()
        acc, sd = row["accuracy_mean"], row["accuracy_std"]
        accuracy = "-" if acc is None else f"{100 * acc:.2f}" + (f" ± {100 * sd:.2f}" if sd is not None else "")
        where = {k: row[k] for k in ("model", "task") if k not in shared}
        rows.append(
            {
                "method": row["group"],
                **where,
                "seeds": row["seeds"],
                "accuracy %": accuracy + (f" ({row['unfinished']} unfinished)" if row["unfinished"] else ""),
                "zero-shot %": _fmt_pct(row["zero_shot_mean"]),
                "queries": _fmt_int(row["queries"]),
                "bytes up": _fmt_int(row["bytes_up_per_client_round"]),
                "bytes down": _fmt_int(row["bytes_down_per_client_round"]),
                "peak MB": _fmt_int(row["peak_memory_mb"]),
                "time s": "-" if row["seconds_mean"] is None else f"{row['seconds_mean']:.1f}",
            }
        )
    return rows


def shared_fields(groups: Sequence[Group]) -> dict[str, str]:
    """Model and task where every run has the same one (the table's title then, not a column)."""
    out = {}
    for name in ("model", "task"):
        values = {getattr(r, name) for g in groups for r in g.runs}
        if len(values) == 1:
            out[name] = values.pop()
    return out


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _fmt_int(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"
