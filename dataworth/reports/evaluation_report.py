"""The evaluation report: method × metric table, LDS scatter, brittleness curves, score histograms."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

from dataworth.config import LoggingConfig
from dataworth.reports.html import CSS, escape, figure, histogram_png, metrics_html, png_bytes, run_info_html


def lds_scatter_png(scatter: dict[str, Any]) -> bytes:
    """Predicted subset score vs retrained log-prob of one query, one panel per method."""
    methods = list(scatter["predicted"])
    ncols = min(4, len(methods))
    nrows = math.ceil(len(methods) / ncols)
    fig = figure(3.4 * ncols, 2.8 * nrows)
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
    return png_bytes(fig)


def brittleness_png(curves: dict[str, dict[str, float]]) -> bytes:
    """Mean increase of the query loss after removing the top-k (per method) vs k random examples."""
    fig = figure(5.2, 3.4)
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
    return png_bytes(fig)


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
        plots["score_histograms.png"] = histogram_png(score_samples)
    return plots


def evaluation_notes(
    benchmark: str,
    sizes: tuple[int, int, int],
    logging: LoggingConfig,
    curvature_kind: str,
    damping: float,
    calibrated: bool,
    loo: dict[str, float] | None = None,
    calibration: dict[str, Any] | None = None,
    tracin: dict[str, Any] | None = None,
) -> list[str]:
    """What the table was measured on, as sentences under it: the benchmark's sizes (documents, examples,
    queries), the projection, the curvature and its damping, leave-one-out agreement, the calibration, the
    checkpoints of the tracin-* methods ({"steps": of each checkpoint index, "weights": η of each, final first})."""
    documents, examples, queries = sizes
    kfac = ""
    if logging.precondition == "kfac":
        kfac = f", KFAC-whitened (λ {logging.precondition_damping:g} × mean eigenvalue)"
    if logging.precondition == "kfac" and logging.basis == "pca":
        kfac += ", PCA basis (top eigenvectors of each KFAC factor)"
    if logging.optimizer_state is not None:
        kfac += ", gradients divided by the optimizer's √v (factored)"
    notes = [
        f"{benchmark}: {documents} documents, {examples} examples, {queries} queries; "
        + (
            f"projection rapidgrad, K = {logging.rapidgrad_dim or 'proj_dim_in × proj_dim_out'} per layer{kfac}"
            if logging.projection == "rapidgrad"
            else f"projection {logging.projection} {logging.proj_dim_in}×{logging.proj_dim_out} per layer{kfac}"
        )
        + f"; curvature {curvature_kind}, damping {damping:g}"
        + (" (calibrated)." if calibrated else ".")
    ]
    if tracin:
        weights = ", ".join(f"{w:.3g}" for w in tracin["weights"])
        n, steps = len(tracin["steps"]), ", ".join(str(s) for s in tracin["steps"])
        notes.append(
            f"tracin-*: every gradient mode summed over the final model and {n} earlier "
            f"checkpoint{'s' if n != 1 else ''} (after steps {steps}), each indexed with the same "
            f"config, weighted by the learning rate at each (final first: {weights})."
        )
    if loo:
        notes.append(
            f"Leave-one-out on softmax regression: Pearson {loo['pearson_hessian']:.3f} (exact Hessian), "
            f"{loo['pearson_fisher']:.3f} (empirical Fisher, as dataworth's raw curvature)."
        )
    if calibration:
        notes.append(
            f"Calibrated damping factor {calibration['damping_factor']} on {calibration['proxy']} "
            f"(recorded in the index manifest): {json.dumps(calibration['sweep'])}"
        )
        if "proj_sweep" in calibration:
            notes.append(
                f"Projection size chosen on {calibration['proxy']}: {calibration['proj_dim']} per layer "
                f"(index {calibration['index_uri']}); tune/test per size at its best damping: "
                f"{json.dumps(calibration['proj_sweep'])}"
            )
        if "task_mix" in calibration:
            notes.append(
                f"trackstar's task_mix chosen on {calibration['proxy']}: {calibration['task_mix']} (recorded in the "
                f"index manifest); tune/test per share: {json.dumps(calibration['task_mix_sweep'])}"
            )
    return notes


def render_evaluation_report(
    title: str,
    table: dict[str, dict[str, float]],
    run_info: dict[str, str] | None = None,
    plots: dict[str, bytes] | None = None,
    notes: list[str] | None = None,
) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body><main>",
        f'<section class="card"><h1>{escape(title)}</h1>{run_info_html(run_info)}</section>',
        metrics_html(table),
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
