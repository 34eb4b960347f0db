"""Query stages: score queries against a published index, render the report."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from pydantic import BaseModel, ConfigDict, Field

from dataworth.attribution.scoring import Scorer, needs_norms
from dataworth.config import GenerationConfig, QuerySpec, ScoreConfig
from dataworth.reports.html import write_report
from dataworth.reports.query_report import render_query_report
from storage import IndexManifest, IndexStore, load_results, queries_table, scores_table, write_csv

from .common import (
    CACHE,
    IO_RETRIES,
    gradient_batches,
    index_curvature,
    index_norms,
    index_query_gradients,
    open_index_model,
)


def score_run_id(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=lambda o: o.model_dump(mode="json"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Scored(BaseModel):
    """One scoring run written to the scores and queries tables by score_queries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    score_run_id: str = Field(description="Run id of the stored scores and queries rows.")
    queries: int = Field(description="Queries scored.")
    pairs: int = Field(description="Query × training example pairs scored (over all modes).")
    pairs_per_s: float = Field(description="Scoring throughput, pairs per second.")
    query_gradient_seconds: float = Field(description="Time to encode the queries and take their gradients.")
    score_seconds: float = Field(description="Time of the streaming pass over the stored gradients.")

    @property
    def compute_seconds(self) -> float:
        return self.query_gradient_seconds + self.score_seconds

    def metrics(self) -> dict[str, float]:
        return {
            "queries": self.queries,
            "query_gradient_seconds": self.query_gradient_seconds,
            "score_seconds": self.score_seconds,
            "score_pairs_per_s": self.pairs_per_s,
            "score_pairs": self.pairs,
        }


class Report(BaseModel):
    """The files render_report wrote."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    report: str = Field(description="Path of the HTML report.")
    topk_csv: str | None = Field(description="Path of the top-k CSV; None when no scores were stored.")

    def metrics(self) -> dict[str, float]:
        return {}

    @property
    def files(self) -> list[str]:
        """Files to keep as MLflow artifacts."""
        return [self.report] + ([self.topk_csv] if self.topk_csv else [])


@task(name="score_queries", cache_policy=CACHE, persist_result=True, tags=["gpu"], **IO_RETRIES)
def score_queries(
    index_uri: str,
    manifest: IndexManifest,
    queries: list[QuerySpec],
    score: ScoreConfig,
    generation: GenerationConfig,
    full_matrix_path: str | None = None,
) -> Scored:
    """Query gradients (generating missing completions), then every mode over one streaming pass."""
    log = get_run_logger()
    store = IndexStore(index_uri)
    start = time.perf_counter()
    index = open_index_model(store, manifest)
    encoded, q_grads = index_query_gradients(index, queries, generation, score.query_batch_size)
    query_seconds = time.perf_counter() - start
    curvature = index_curvature(store, manifest, score.damping_factor)
    # Stored by fit_curvature for the index's damping; another damping computes and stores its own once.
    norms = index_norms(store, manifest, curvature, score.train_batch_size) if needs_norms(score.modes) else None

    version = manifest.gradients_version
    n_train = manifest.num_examples
    full = n_train if full_matrix_path else None
    scorer = Scorer(q_grads, curvature, score.modes, score.top_k, full, norms=norms)
    start = time.perf_counter()
    for ids, vectors in gradient_batches(store, score.train_batch_size, version):  # the next batch reads meanwhile
        scorer.update(ids, vectors)
    score_seconds = time.perf_counter() - start

    # The whole manifest (it carries published_at): table versions alone restart after an overwrite.
    srid = score_run_id(manifest, queries, score, generation)
    query_ids = [q.id for q in encoded]
    topk = {mode: (top.ids.numpy(), top.scores.numpy()) for mode, top in scorer.topk.items()}
    store.write_scores(srid, scores_table(srid, query_ids, topk, version))
    store.write_queries(srid, queries_table(srid, encoded))
    if full_matrix_path:
        Path(full_matrix_path).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            full_matrix_path, **{m: v.numpy() for m, v in scorer.full.items()}, query_ids=np.array(query_ids)
        )
    pairs_per_s = scorer.pairs / max(score_seconds, 1e-9)
    log.info(
        "scored %d queries × %d examples × %d modes (%.0f pairs/s)",
        len(encoded),
        n_train,
        len(score.modes),
        pairs_per_s,
    )
    return Scored(
        score_run_id=srid,
        queries=len(encoded),
        pairs=scorer.pairs,
        pairs_per_s=pairs_per_s,
        query_gradient_seconds=query_seconds,
        score_seconds=score_seconds,
    )


@task(name="render_report", **IO_RETRIES)
def render_report(
    index_uri: str,
    srid: str,
    report_dir: str,
    title: str,
    run_info: dict,
    relevant: dict[str, list[str]] | None = None,
    metrics: dict | None = None,
) -> Report:
    """HTML report and top-k CSV of one scoring run, saved under report_dir."""
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
        write_csv(flat, csv_path)
    return Report(report=str(path), topk_csv=str(csv_path) if flat else None)
