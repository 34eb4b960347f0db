"""The results of one scoring run, read back and joined with the examples they rank."""

from __future__ import annotations

from dataworth.config import default_results_uri
from storage.store import IndexStore


def results_store(index_uri: str, results_uri: str | None = None) -> IndexStore:
    """The store of query results (scores, queries, query-side artifacts) of the index at index_uri: results_uri,
    else its default beside the index (dataworth.config.default_results_uri)."""
    return IndexStore(results_uri or default_results_uri(index_uri))


def load_results(
    index_uri: str, score_run_id: str, results_uri: str | None = None, examples_version: int | None = None
) -> tuple[list[dict], dict[str, dict[str, list[dict]]]]:
    """(queries, mode -> query id -> ranked rows joined with example text) of one scoring run: its scores from the
    results store, the examples' text from the index (at examples_version, the one the scores were computed
    against, while a rebuild may be writing the next)."""
    store = IndexStore(index_uri)
    results_at = results_store(index_uri, results_uri)
    queries = results_at.read_queries(score_run_id).to_pylist()
    scores = results_at.read_scores(score_run_id).to_pylist()
    ids = sorted({r["example_id"] for r in scores})
    examples = {}
    if ids:
        where = f"example_id IN ({', '.join(str(i) for i in ids)})"
        columns = ["example_id", "document_id", "text", "source"]
        for r in store.read_examples(columns=columns, version=examples_version, where=where).to_pylist():
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
    return queries, results
