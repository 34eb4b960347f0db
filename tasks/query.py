"""Query stages: inspect an index, score queries against it, render the report."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import torch
from prefect import get_run_logger, task

from dataworth.attribution.curvature import Curvature
from dataworth.attribution.gradients import query_gradients
from dataworth.attribution.scoring import Scorer
from dataworth.config import GenerationConfig, LoggingConfig, ModelConfig, QuerySpec, ScoreConfig
from dataworth.data import pad_token_id
from dataworth.model import context_length
from dataworth.queries import encode_queries
from dataworth.reports.query_report import render_query_report, write_report
from storage import IndexStore

from .common import CACHE, IO_RETRIES, MODEL_LOCK, cached_model
from .index import load_projections
from .tracking import Tracker


def score_run_id(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=lambda o: o.model_dump(mode="json"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def index_curvature(store: IndexStore, manifest: dict, damping_factor: float | None) -> Curvature:
    """The index's fitted curvature, damped by the given factor, else by the calibrated one recorded in the
    manifest (`dataworth evaluate --calibrate`), else as fitted."""
    blob = store.read_artifact(manifest["curvature_artifact"])
    if blob is None:
        raise ValueError(
            f"index {store.uri!r} lists curvature {manifest['curvature_artifact']!r} but it is missing; "
            "rebuild the index (dataworth index ... --overwrite)"
        )
    curvature = Curvature.from_bytes(blob)
    if damping_factor is None and manifest.get("calibration"):
        damping_factor = manifest["calibration"]["damping_factor"]
    return curvature if damping_factor is None else curvature.with_damping(damping_factor)


def index_logging_config(manifest: dict) -> LoggingConfig:
    """The logging config an index was built with; indexes from before KFAC whitening used plain projections."""
    return LoggingConfig(**{"precondition": "none", **manifest["config"]["logging"]})


def index_query_gradients(
    store: IndexStore, manifest: dict, queries: list[QuerySpec], generation: GenerationConfig, batch_size: int
):
    """(encoded queries, their gradients) with the index's own model and projections."""
    model_cfg = ModelConfig(**manifest["config"]["model"])
    logging_cfg = index_logging_config(manifest)
    fitted = load_projections(store, manifest.get("projections_artifact"))
    lm, tokenizer = cached_model(model_cfg)
    with MODEL_LOCK:
        limit = context_length(lm, manifest["config"]["data"]["max_length"])
        encoded = encode_queries(lm, tokenizer, queries, generation, limit, batch_size)
        q_grads = query_gradients(lm, encoded, logging_cfg, pad_token_id(tokenizer), batch_size, fitted)
    if q_grads.shape[1] != manifest["dim"]:
        raise ValueError(
            f"query gradients have {q_grads.shape[1]} dims, the index {manifest['dim']}: "
            "the model or logging config no longer matches the index; rebuild it"
        )
    return encoded, q_grads


@task(name="score_queries", cache_policy=CACHE, persist_result=True, tags=["gpu"], **IO_RETRIES)
def score_queries(
    index_uri: str,
    manifest: dict,
    queries: list[QuerySpec],
    score: ScoreConfig,
    generation: GenerationConfig,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    full_matrix_path: str | None = None,
) -> dict:
    """Query gradients (generating missing completions), then every mode over one streaming pass."""
    log = get_run_logger()
    store = IndexStore(index_uri)
    start = time.perf_counter()
    encoded, q_grads = index_query_gradients(store, manifest, queries, generation, score.query_batch_size)
    query_seconds = time.perf_counter() - start
    curvature = index_curvature(store, manifest, score.damping_factor)

    version = manifest["gradients_version"]
    n_train = manifest["num_examples"]
    scorer = Scorer(q_grads, curvature, score.modes, score.top_k, n_train if full_matrix_path else None)
    start = time.perf_counter()
    for ids, vectors, _sq in store.iter_gradients(score.train_batch_size, version=version):
        scorer.update(torch.tensor(ids), torch.tensor(vectors))
    score_seconds = time.perf_counter() - start

    # The whole manifest (it carries published_at): table versions alone restart after an overwrite.
    srid = score_run_id(manifest, queries, score, generation)
    rows = {"run_id": [], "query_id": [], "example_id": [], "score": [], "rank": [], "mode": [], "index_version": []}
    for mode, top in scorer.topk.items():
        for qi, q in enumerate(encoded):
            for r, (eid, s) in enumerate(zip(top.ids[qi].tolist(), top.scores[qi].tolist()), start=1):
                for key, val in zip(rows, (srid, q.id, eid, s, r, mode, version)):
                    rows[key].append(val)
    from storage.schemas import queries_schema, scores_schema

    store.write_scores(srid, pa.table(rows, schema=scores_schema()))
    store.write_queries(
        srid,
        pa.table(
            {
                "run_id": [srid] * len(encoded),
                "query_id": [q.id for q in encoded],
                "prompt": [q.prompt for q in encoded],
                "completion": [q.completion for q in encoded],
                "generated": [q.generated for q in encoded],
                "num_completion_tokens": pa.array([len(q.completion_ids) for q in encoded], pa.int32()),
            },
            schema=queries_schema(),
        ),
    )
    if full_matrix_path:
        Path(full_matrix_path).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            full_matrix_path,
            **{m: v.numpy() for m, v in scorer.full.items()},
            query_ids=np.array([q.id for q in encoded]),
        )
    pairs_per_s = scorer.pairs / max(score_seconds, 1e-9)
    Tracker.attach(tracking_uri, run_id).metrics(
        {
            "queries": len(encoded),
            "query_gradient_seconds": query_seconds,
            "score_seconds": score_seconds,
            "score_pairs_per_s": pairs_per_s,
            "score_pairs": scorer.pairs,
        }
    )
    log.info(
        "scored %d queries × %d examples × %d modes (%.0f pairs/s)",
        len(encoded),
        n_train,
        len(score.modes),
        pairs_per_s,
    )
    return {
        "score_run_id": srid,
        "queries": len(encoded),
        "pairs": scorer.pairs,
        "pairs_per_s": pairs_per_s,
        "compute_seconds": query_seconds + score_seconds,
    }


def load_results(index_uri: str, srid: str) -> tuple[list[dict], dict[str, dict[str, list[dict]]]]:
    """(queries, mode -> query id -> ranked rows joined with example text) of one scoring run."""
    store = IndexStore(index_uri)
    q = store.read_queries(srid).to_pylist()
    scores = store.read_scores(srid).to_pylist()
    ids = sorted({r["example_id"] for r in scores})
    examples = {}
    if ids:
        where = f"example_id IN ({', '.join(str(i) for i in ids)})"
        for r in store.read_examples(columns=["example_id", "document_id", "text", "source"], where=where).to_pylist():
            examples[r["example_id"]] = r
    results: dict[str, dict[str, list[dict]]] = {}
    for r in sorted(scores, key=lambda r: (r["mode"], r["query_id"], r["rank"])):
        ex = examples.get(r["example_id"], {})
        results.setdefault(r["mode"], {}).setdefault(r["query_id"], []).append(
            {
                "rank": r["rank"],
                "score": r["score"],
                "example_id": r["example_id"],
                "document_id": ex.get("document_id", "?"),
                "text": ex.get("text", ""),
                "source": ex.get("source"),
            }
        )
    return q, results


@task(name="render_report", **IO_RETRIES)
def render_report(
    index_uri: str,
    srid: str,
    report_dir: str,
    title: str,
    run_info: dict,
    relevant: dict[str, list[str]] | None = None,
    metrics: dict | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """HTML report and top-k CSV of one scoring run, saved locally and as MLflow artifacts."""
    queries, results = load_results(index_uri, srid)
    for by_query in results.values():
        for qid, rows in by_query.items():
            for row in rows:
                row["relevant"] = None if relevant is None else row["document_id"] in set(relevant.get(qid, []))
    samples = {m: [r["score"] for rows in bq.values() for r in rows] for m, bq in results.items()}
    queries = [
        {"id": q["query_id"], "prompt": q["prompt"], "completion": q["completion"], "generated": q["generated"]}
        for q in queries
    ]
    html = render_query_report(title, queries, results, metrics, run_info, samples)
    out = Path(report_dir)
    path = write_report(html, out / f"report-{srid}.html")
    flat = [
        {"mode": m, "query_id": q, **{k: v for k, v in r.items() if k != "text"}}
        for m, bq in results.items()
        for q, rows in bq.items()
        for r in rows
    ]
    csv_path = out / f"topk-{srid}.csv"
    if flat:
        pacsv.write_csv(pa.Table.from_pylist(flat), csv_path)
    tracker = Tracker.attach(tracking_uri, run_id)
    tracker.artifact(path)
    if flat:
        tracker.artifact(csv_path)
    return {"report": str(path), "topk_csv": str(csv_path) if flat else None}
