"""The evaluation report: the method × metric table assembled from every stage's results, its notes and
plots, written as HTML, Markdown and JSON beside the run's other reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import Field

from dataworth.config import ALL_SCORE_MODES, HYBRID_MODES, LoggingConfig
from dataworth.evaluation.config import EvaluateConfig
from dataworth.evaluation.matrices import merge_matrices, rank_correlations
from dataworth.evaluation.subsets import brittleness_curves
from dataworth.reports.evaluation_report import evaluation_notes, evaluation_plots, render_evaluation_report
from dataworth.reports.html import write_report
from dataworth.reports.terminal import format_evaluation, format_table

from .common import IO_RETRIES, StageResult

# Modes scored from the index's gradients: their compute time is the index's plus the query flow's (they share it),
# but for the search of the lexical and hybrid modes, which a gradient mode does not need.
_INDEX_MODES = (*ALL_SCORE_MODES, *HYBRID_MODES)


class EvaluationReport(StageResult):
    """The assembled table and where its report went."""

    table: dict[str, dict[str, float | int]] = Field(description="method -> metric -> value.")
    notes: list[str] = Field(description="What the table was measured on, one sentence each.")
    report: str = Field(description="The HTML report.")
    markdown: str = Field(description="The table and notes as Markdown.")
    plots: list[str] = Field(description="The report's plots as PNG files.")
    record: str = Field(description="The table, leave-one-out and calibration results as JSON.")
    summary: str = Field(description="The table and notes for the terminal.")


def _merge(table: dict, part: dict) -> None:
    for method, metrics in part.items():
        table.setdefault(method, {}).update(metrics)


@task(name="assemble_evaluation_report", **IO_RETRIES)
def assemble_evaluation_report(
    config: EvaluateConfig,
    report_dir: str,
    run_info: dict[str, str],
    matrix_paths: list[str],
    measured: list[dict[str, dict[str, float]]],
    sizes: tuple[int, int, int],
    logging: LoggingConfig,
    lds_scatter: dict[str, Any] | None = None,
    removals: list[dict] | None = None,
    removed_log_probs: list[list[float]] | None = None,
    full_log_probs: list[float] | None = None,
    kronfluence_seconds: float | None = None,
    attribution_seconds: float = 0.0,
    search_seconds: float = 0.0,
    method_seconds: dict[str, float] | None = None,
    tracin: dict[str, Any] | None = None,
    loo: dict[str, float] | None = None,
    calibration: dict[str, Any] | None = None,
) -> EvaluationReport:
    """Merge the stages' tables (fact tracing, tail-patch, LDS, in `measured` order), add brittleness curves,
    rank correlations with kronfluence and compute times; write the HTML report, its plots and the Markdown.

    sizes: (documents, examples, queries) of the benchmark; logging: the config of the index measured.
    attribution_seconds: the index's and the query run's compute; search_seconds, the part of it the full-text
    searches, fusions and reranks of bm25 and the hybrid modes took: a gradient mode's `seconds` leave it out.
    method_seconds: the compute of methods that pay for more than that (tracin-*: every checkpoint's index).
    """
    table: dict[str, dict[str, float]] = {}
    for part in measured:
        _merge(table, part)
    scores, _ = merge_matrices(matrix_paths)
    brittleness = None
    if removals is not None:
        brittleness = brittleness_curves(removals, removed_log_probs, full_log_probs)
        for method, curve in brittleness.items():
            table.setdefault(method, {}).update({f"brittle@{k}": v for k, v in curve.items()})
    if kronfluence_seconds is not None:
        for method, rho in rank_correlations(scores, "kronfluence").items():
            table.setdefault(method, {})["ρ vs kronfluence"] = rho
        table["kronfluence"]["seconds"] = kronfluence_seconds
    for method in _INDEX_MODES:
        if method in table:
            own = attribution_seconds - (search_seconds if method in ALL_SCORE_MODES else 0.0)
            table[method]["seconds"] = max(own, 0.0)
    for method, seconds in (method_seconds or {}).items():  # methods with compute of their own (TracIn's indexes)
        if method in table:
            table[method]["seconds"] = seconds

    damping = (
        config.score.damping_factor or (calibration or {}).get("damping_factor") or config.curvature.damping_factor
    )
    calibrated = bool(calibration) and config.score.damping_factor is None
    notes = evaluation_notes(
        config.benchmark, sizes, logging, config.curvature.kind, damping, calibrated, loo, calibration, tracin
    )
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = evaluation_plots(lds_scatter, brittleness, {m: s.ravel().tolist() for m, s in scores.items()})
    for name, png in plots.items():
        (out / name).write_bytes(png)
    title = f"dataworth evaluate: {config.benchmark}"
    report = write_report(render_evaluation_report(title, table, run_info, plots, notes), out / "evaluation.html")
    markdown = out / "evaluation.md"
    markdown.write_text(format_table(table) + "\n\n" + "\n".join(f"- {x}" for x in notes) + "\n")
    return EvaluationReport(
        table=table,
        notes=notes,
        report=str(report),
        markdown=str(markdown),
        plots=[str(out / name) for name in plots],
        record=json.dumps({"table": table, "loo": loo, "calibration": calibration}, indent=2, default=float),
        summary=format_evaluation(table, notes),
    )
