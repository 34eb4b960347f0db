"""The evaluation report: method × metric table, LDS scatter, brittleness curves, score histograms."""

from __future__ import annotations

import base64
import io
import math
from html import escape
from typing import Any

from dataworth.reports.query_report import _CSS, _histogram_png, _metrics_html, _run_info_html


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A Markdown table, methods as rows (for the terminal and the README)."""
    metrics: list[str] = []
    for row in table.values():
        metrics.extend(m for m in row if m not in metrics)
    lines = ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for method, row in table.items():
        cells = []
        for m in metrics:
            v = row.get(m)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("–")
            else:
                cells.append(str(int(v)) if float(v).is_integer() and abs(v) >= 1 else f"{v:.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def lds_scatter_png(scatter: dict[str, Any]) -> bytes:
    """Predicted subset score vs retrained log-prob of one query, one panel per method."""
    methods = list(scatter["predicted"])
    ncols = min(4, len(methods))
    nrows = math.ceil(len(methods) / ncols)
    fig = _figure(3.4 * ncols, 2.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, method in zip(axes.flat, methods):
        ax.scatter(scatter["predicted"][method], scatter["actual"], s=12, alpha=0.8)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("Σ predicted score over subset", fontsize=8)
        ax.set_ylabel("log p(completion), retrained", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(methods) :]:
        ax.set_visible(False)
    fig.suptitle(f"LDS scatter for query {scatter['query']}", fontsize=10)
    return _png(fig)


def brittleness_png(curves: dict[str, dict[str, float]]) -> bytes:
    """Mean increase of the query loss after removing the top-k (per method) vs k random examples."""
    fig = _figure(5.2, 3.4)
    ax = fig.subplots()
    for method, points in curves.items():
        ks = sorted(points, key=int)
        ax.plot(
            [int(k) for k in ks],
            [points[k] for k in ks],
            marker="o",
            label=method,
            linestyle="--" if method == "random" else "-",
        )
    ax.set_xlabel("training examples removed (k)")
    ax.set_ylabel("Δ query loss after retraining")
    ax.axhline(0, color="#8c959f", linewidth=0.8)
    ax.legend(fontsize=8)
    return _png(fig)


# file name -> (section title, alt text); the order is the report's
PLOTS = {
    "lds_scatter.png": ("Linear datamodeling", "LDS scatter"),
    "brittleness.png": ("Brittleness", "Brittleness curves"),
    "score_histograms.png": ("Score distributions", "Histogram of scores per mode"),
}


def evaluation_plots(
    lds_scatter: dict[str, Any] | None = None,
    brittleness: dict[str, dict[str, float]] | None = None,
    score_samples: dict[str, list[float]] | None = None,
) -> dict[str, bytes]:
    """PNG bytes per plot that has data (file names as in PLOTS), for the report and as files."""
    plots = {}
    if lds_scatter:
        plots["lds_scatter.png"] = lds_scatter_png(lds_scatter)
    if brittleness:
        plots["brittleness.png"] = brittleness_png(brittleness)
    if score_samples:
        plots["score_histograms.png"] = _histogram_png(score_samples)
    return plots


def render_evaluation_report(
    title: str,
    table: dict[str, dict[str, float]],
    run_info: dict[str, str] | None = None,
    plots: dict[str, bytes] | None = None,
    notes: list[str] | None = None,
) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body><main>",
        f'<section class="card"><h1>{escape(title)}</h1>{_run_info_html(run_info)}</section>',
        _metrics_html(table),
    ]
    if notes:
        items = "".join(f"<li>{escape(n)}</li>" for n in notes)
        parts.append(f'<section class="card"><h2 style="margin-top:0">Notes</h2><ul>{items}</ul></section>')
    for name, (heading, alt) in PLOTS.items():
        if plots and name in plots:
            png = base64.b64encode(plots[name]).decode("ascii")
            parts.append(
                f'<section class="card"><h2 style="margin-top:0">{heading}</h2>'
                f'<img class="plot" alt="{alt}" src="data:image/png;base64,{png}"></section>'
            )
    parts.append("</main></body></html>")
    return "".join(parts)
