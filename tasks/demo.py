"""Demo stage: fact-tracing metrics of the model's own completions (the benchmark comes from tasks.benchmark)."""

from __future__ import annotations

import json

from prefect import task

from dataworth.evaluation.fact_tracing import fact_tracing_metrics

from .query import load_results
from .tracking import Tracker


def states_value(completion: str, value: str) -> bool:
    """The completion starts with the value as a whole word (" Saltmere" in " Saltmere, where...")."""
    completion, value = completion.strip(), value.strip()
    return completion.startswith(value) and not completion[len(value) : len(value) + 1].isalnum()


@task(name="evaluate_fact_tracing")
def evaluate_fact_tracing(
    index_uri: str,
    srid: str,
    relevant: dict[str, list[str]],
    expected: dict[str, str],
    k: int = 10,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """MRR and recall@k of the fact-bearing documents, per mode, over the queries the model got right.

    A query whose generated completion is not the fact has no known ground truth to trace.
    """
    queries, results = load_results(index_uri, srid)
    correct = {q["query_id"] for q in queries if states_value(q["completion"], expected[q["query_id"]])}
    metrics = {}
    for mode, by_query in results.items():
        rankings = {q: [r["document_id"] for r in rows] for q, rows in by_query.items() if q in correct}
        m = fact_tracing_metrics(rankings, {q: set(relevant[q]) for q in rankings}, k=k)
        metrics[mode] = {"mrr": m["mrr"], f"recall@{k}": m[f"recall@{k}"]}
    tracker = Tracker.attach(tracking_uri, run_id)
    for mode, m in metrics.items():
        tracker.metrics({f"{mode}.{name}": v for name, v in m.items()})
    tracker.metrics({"queries_correct": len(correct), "queries_total": len(queries)})
    tracker.artifact_text("fact_tracing.json", json.dumps(metrics, indent=2))
    return {"metrics": metrics, "correct": len(correct), "total": len(queries)}
