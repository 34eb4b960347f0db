"""Demo stages: fact-tracing metrics of the model's own completions, and the demo's terminal summary
(the benchmark comes from tasks.benchmark, the scoring run from the query flow)."""

from __future__ import annotations

import json

from prefect import task
from pydantic import Field

from dataworth.evaluation.fact_tracing import states_value, trace_facts
from dataworth.reports.terminal import format_fact_tracing, format_top_results
from storage import load_results

from .common import StageResult


class FactTracing(StageResult):
    """Fact-tracing metrics per mode over the queries whose generated completion states the fact."""

    table: dict[str, dict[str, float]] = Field(description="mode -> {mrr, recall@k}.")
    correct: int = Field(description="Queries the model completed with the fact (the ones traced).")
    total: int = Field(description="Queries scored.")

    def metrics(self) -> dict[str, float]:
        per_mode = {f"{mode}.{name}": v for mode, m in self.table.items() for name, v in m.items()}
        return {**per_mode, "queries_correct": self.correct, "queries_total": self.total}

    @property
    def as_json(self) -> str:
        return json.dumps(self.table, indent=2)


@task(name="evaluate_fact_tracing")
def evaluate_fact_tracing(
    index_uri: str, srid: str, relevant: dict[str, list[str]], expected: dict[str, str], k: int = 10
) -> FactTracing:
    """MRR and recall@k of the fact-bearing documents, per mode, over the queries the model got right.

    A query whose generated completion is not the fact has no known ground truth to trace.
    """
    queries, results = load_results(index_uri, srid)
    correct = {q["query_id"] for q in queries if states_value(q["completion"], expected[q["query_id"]])}
    rankings = {
        mode: {q: [r["document_id"] for r in rows] for q, rows in by_query.items() if q in correct}
        for mode, by_query in results.items()
    }
    return FactTracing(table=trace_facts(rankings, relevant, k=k), correct=len(correct), total=len(queries))


@task(name="summarize_demo")
def summarize_demo(
    index_uri: str,
    srid: str,
    relevant: dict[str, list[str]],
    show: int,
    tracing: FactTracing,
    fact_accuracy: float,
) -> str:
    """The demo's terminal summary: each of the first `show` queries with its top-5 documents (mode relatif
    when scored), then the fact-tracing table."""
    queries, results = load_results(index_uri, srid)
    mode = "relatif" if "relatif" in results else next(iter(results))
    return (
        format_top_results(queries, results, relevant, mode, show)
        + "\n"
        + format_fact_tracing(tracing.table, tracing.correct, tracing.total, fact_accuracy)
    )


@task(name="write_prompts")
def write_prompts(queries_path: str, out_path: str) -> str:
    """The queries without their completions: the usual case, attributing what the model generates."""
    with open(queries_path) as src, open(out_path, "w") as dst:
        for line in src:
            if line.strip():
                q = json.loads(line)
                dst.write(json.dumps({"id": q["id"], "prompt": q["prompt"]}) + "\n")
    return out_path
