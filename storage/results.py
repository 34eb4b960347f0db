"""The results of one scoring run, read back and joined with the examples they rank."""

from __future__ import annotations

from storage.store import IndexStore


def load_results(index_uri: str, score_run_id: str) -> tuple[list[dict], dict[str, dict[str, list[dict]]]]:
    """(queries, mode -> query id -> ranked rows joined with example text) of one scoring run."""
    store = IndexStore(index_uri)
    queries = store.read_queries(score_run_id).to_pylist()
    scores = store.read_scores(score_run_id).to_pylist()
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
    return queries, results
