"""The compare report's pictures and page: accuracy-vs-cost plots as PNG bytes, a self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

from bbfl.compare.runs import Group, RunResult


def plot_png(groups: Sequence[Group], x: str) -> bytes | None:
    """Accuracy against ``x`` ('queries' or 'bytes') for every group with such a curve, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = {"queries": 0, "bytes": 1}[x]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for group in groups:
        curve = group.mean_curve()
        if x == "bytes" and not any(p[1] > 0 for p in curve):
            continue  # a centralised run sends nothing: it has no place on a bytes axis
        if len(curve) >= 1:
            ax.plot([p[index] for p in curve], [100 * p[2] for p in curve], marker=".", label=group.label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training queries" if x == "queries" else "bytes sent and received (cumulative, all clients)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"accuracy vs. {x} (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def html_page(title: str, rows: Sequence[dict[str, Any]], images: dict[str, bytes], runs: Sequence[RunResult]) -> str:
    """A self-contained page: the table, the plots inlined as base64 PNG, and the runs it was made from."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0]) if rows else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    figures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name, png in images.items()
    )
    listing = "".join(f"<li><code>{html.escape(str(r.path))}</code></li>" for r in runs)
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
        "td:first-child,th:first-child{text-align:left}figure{display:inline-block;margin:1em}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>bbfl compare</title><style>{style}</style></head>"
        f"<body><h1>bbfl compare</h1><p>{html.escape(title)}; accuracy is mean ± sample std over "
        f"seeds.</p><table><tr>{head}</tr>{body}</table>{figures}<h2>Runs</h2><ul>{listing}</ul>"
        "</body></html>"
    )
