"""The `query` flow: query gradients → score against a published index → top-k table (→ token-wise splits of the
top scores) → report."""

from __future__ import annotations

import os
import tempfile
import time

from prefect import flow, get_run_logger

from dataworth.attribution.tokenwise import check_tokenwise
from dataworth.config import QueryConfig
from dataworth.errors import ConfigError
from dataworth.fingerprint import check_model_fingerprint
from dataworth.queries import load_queries
from storage import IndexStore
from tasks.index import index_state
from tasks.query import (
    check_checkpoint_indexes,
    merge_scores,
    query_gradients,
    render_report,
    score_queries,
    score_shard_range,
)
from tasks.tokenwise import tokenwise_scores
from tasks.tracking import tracked_run


def default_report_dir(results_uri: str) -> str:
    local = IndexStore(results_uri).local_path
    if local is None:
        return os.path.join(os.environ.get("DATAWORTH_WORKSPACE", "dataworth-runs"), "reports")
    return os.path.join(local, "reports")


def check_writable(results_uri: str) -> None:
    """Fail before any work when query results cannot be written where they are to go (a local location only:
    object stores answer at the first write)."""
    path = IndexStore(results_uri).local_path
    if path is None:
        return
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(
            f"query results cannot be written to {path!r} ({err.strerror or err})",
            fix="give a writable location with --results DIR (an index on read-only storage is queried that way)",
        ) from err


def score_sharded(run, config: QueryConfig, manifest, queries, full_path: str | None, model_fingerprint: str):
    """Query gradients once, then one score_shard_range task per shards_per_task shards (side by side on the
    flow's task runner), then their exact top-k merge: the same stored result as one score_queries task."""
    uri, score, results = config.index_uri, config.score, config.results_location
    query = run.log_result(
        "query_gradients",
        query_gradients(
            uri,
            manifest,
            queries,
            score,
            config.generation,
            model_fingerprint=model_fingerprint,
            results_uri=results,
            return_state=True,
        ),
    )
    futures = [
        score_shard_range.submit(
            uri, manifest, query, score, shards, full_matrix=full_path is not None, results_uri=results
        )
        for shards in manifest.shard_ranges(score.shards_per_task)
    ]
    ranges = [run.log_result("score_shard_range", f, step=i) for i, f in enumerate(futures)]
    return run.log_result(
        "score_queries",
        merge_scores(
            uri, manifest, query, score, ranges, full_matrix_path=full_path, results_uri=results, return_state=True
        ),
    )


@flow(name="query", log_prints=True)
def query_flow(config: QueryConfig, relevant: dict[str, list[str]] | None = None, title: str | None = None) -> dict:
    """Attribute each query's completion to the training examples of an index.

    `relevant` (query id → document ids) marks known ground truth in the report.
    """
    log = get_run_logger()
    started = time.perf_counter()
    queries = load_queries(config.queries_path, config.queries)
    if config.index_version is None:
        manifest = index_state(config.index_uri).manifest
    else:
        manifest = IndexStore(config.index_uri).read_manifest(config.index_version)
    if manifest is None:
        raise ValueError(
            f"no published index at {config.index_uri!r}; build one first with `dataworth index` (an interrupted "
            "index run publishes nothing)"
        )
    # Before any cached task: a replaced model must fail here, not return the old model's cached scores.
    model_fp = check_model_fingerprint(manifest.config.model, manifest.model_fingerprint, config.index_uri)
    checkpoints = []
    for uri in config.checkpoint_indexes:  # other checkpoints' indexes of the same corpus: a TracIn sum
        other = index_state(uri).manifest
        if other is None:
            raise ValueError(f"no published index at checkpoint index {uri!r}; build it first with `dataworth index`")
        check_model_fingerprint(other.config.model, other.model_fingerprint, uri)
        checkpoints.append((uri, other))
    check_checkpoint_indexes(config.index_uri, manifest, checkpoints)
    if config.score.tokenwise_top:  # before any model work: what cannot be split is refused, naming the fix
        check_tokenwise(manifest.config.logging, config.score.modes, len(checkpoints))
    results_uri = config.results_location
    check_writable(results_uri)
    report_dir = config.report_dir or default_report_dir(results_uri)
    tags = {"dataworth.index_run": str(manifest.mlflow_run_id)}
    config_path = os.path.join(report_dir, "query_config.yaml")
    with tracked_run(config.tracking, "query", config, tags=tags, config_path=config_path) as run:
        # Named after its run: a second query run never overwrites the first one's matrix.
        matrix = f"score-matrix-{run.run_id or time.strftime('%Y%m%d-%H%M%S')}.npz"
        full_path = os.path.join(report_dir, matrix) if config.score.full_matrix else None
        if config.score.shards_per_task is None:
            scored = run.log_result(
                "score_queries",
                score_queries(
                    config.index_uri,
                    manifest,
                    queries,
                    config.score,
                    config.generation,
                    full_matrix_path=full_path,
                    model_fingerprint=model_fp,
                    results_uri=results_uri,
                    checkpoints=checkpoints or None,
                    checkpoint_weights=config.checkpoint_weight_list if checkpoints else None,
                    return_state=True,
                ),
            )
        else:
            scored = score_sharded(run, config, manifest, queries, full_path, model_fp)
        tokens = None
        if config.score.tokenwise_top:
            tokens = run.log_result(
                "tokenwise_scores",
                tokenwise_scores(
                    config.index_uri,
                    manifest,
                    scored.score_run_id,
                    config.score,
                    config.generation,
                    results_uri=results_uri,
                    return_state=True,
                ),
            )
        build = manifest.config
        run_info = {
            "index": config.index_uri,
            "model": build.model.name_or_path,
            "examples": str(manifest.num_examples),
            "index version": str(manifest.gradients_version),
            "projection": f"{build.logging.projection} → {manifest.dim} dims",
            "curvature": build.curvature.kind,
            **(
                {
                    "checkpoints": ", ".join(
                        f"{u} (w {w:g})"
                        for u, w in zip([config.index_uri, *config.checkpoint_indexes], config.checkpoint_weight_list)
                    )
                }
                if checkpoints
                else {}
            ),
            "mlflow run": str(run.run_id),
            "score run": scored.score_run_id,
        }
        title = title or "dataworth attribution report"
        report = render_report(
            config.index_uri,
            scored.score_run_id,
            report_dir,
            title,
            run_info,
            relevant,
            results_uri=results_uri,
            max_rows=config.score.report_rows,
            examples_version=manifest.examples_version,
        )
        for path in report.files + ([full_path] if full_path else []):
            run.artifact(path)
    log.info("report: %s", report.report)
    return {
        "score_run_id": scored.score_run_id,
        "queries": scored.queries,
        "pairs": scored.pairs,
        "pairs_per_s": scored.pairs_per_s,
        "compute_seconds": scored.compute_seconds,
        "search_seconds": scored.search_seconds,
        "report": report.report,
        "topk_csv": report.topk_csv,
        "tokens_csv": report.tokens_csv,
        "mlflow_run_id": run.run_id,
        "tracking_uri": run.uri,
        "index_uri": config.index_uri,
        "index_version": manifest.gradients_version,
        "results_uri": results_uri,
        "full_matrix": full_path,
        "tokenwise_rows": tokens.rows if tokens is not None else 0,
        "seconds": time.perf_counter() - started,
    }
