"""The `query` flow: query gradients → score against a published index → top-k table and report."""

from __future__ import annotations

import os
import time

from prefect import flow, get_run_logger

from dataworth.config import QueryConfig
from dataworth.queries import load_queries
from tasks.index import index_state
from tasks.query import render_report, score_queries
from tasks.tracking import Tracker


def default_report_dir(index_uri: str) -> str:
    if "://" in index_uri and not index_uri.startswith("file://"):
        return os.path.join(os.environ.get("DATAWORTH_WORKSPACE", "dataworth-runs"), "reports")
    return os.path.join(index_uri.removeprefix("file://"), "reports")


@flow(name="query", log_prints=True)
def query_flow(config: QueryConfig, relevant: dict[str, list[str]] | None = None, title: str | None = None) -> dict:
    """Attribute each query's completion to the training examples of an index.

    `relevant` (query id → document ids) marks known ground truth in the report.
    """
    log = get_run_logger()
    started = time.perf_counter()
    queries = load_queries(config.queries_path, config.queries)
    state = index_state(config.index_uri)
    manifest = state["manifest"]
    if manifest is None:
        raise ValueError(
            f"no published index at {config.index_uri!r}; build one first with `dataworth index` (an interrupted "
            "index run publishes nothing)"
        )
    tracker = Tracker(config.tracking)
    run_id = tracker.start(
        "query",
        config.model_dump(mode="json"),
        {"dataworth.flow": "query", "dataworth.index_run": str(manifest.get("mlflow_run_id"))},
    )
    common = tracker.task_kwargs
    report_dir = config.report_dir or default_report_dir(config.index_uri)
    ok = False
    try:
        full_path = os.path.join(report_dir, "score-matrix.npz") if config.score.full_matrix else None
        scored = score_queries(
            config.index_uri, manifest, queries, config.score, config.generation, full_matrix_path=full_path, **common
        )
        run_info = {
            "index": config.index_uri,
            "model": manifest["config"]["model"]["name_or_path"],
            "examples": str(manifest["num_examples"]),
            "projection": f"{manifest['config']['logging']['projection']} → {manifest['dim']} dims",
            "curvature": manifest["config"]["curvature"]["kind"],
            "mlflow run": str(run_id),
            "score run": scored["score_run_id"],
        }
        report = render_report(
            config.index_uri,
            scored["score_run_id"],
            report_dir,
            title or "dataworth attribution report",
            run_info,
            relevant,
            **common,
        )
        tracker.artifact_text("query_config.json", config.model_dump_json(indent=2))
        if full_path:
            tracker.artifact(full_path)
        ok = True
    finally:
        tracker.finish(ok)
    log.info("report: %s", report["report"])
    return {
        **scored,
        **report,
        "mlflow_run_id": run_id,
        "tracking_uri": tracker.uri,
        "index_uri": config.index_uri,
        "seconds": time.perf_counter() - started,
    }
