"""Fact-tracing metrics: does an attribution ranking put a fact's source documents on top?

Rankings are lists of document ids in score order, best first. A document split into
several chunks can appear several times; it counts once, at its first (best) position,
so a method is neither rewarded for scoring many chunks of one relevant document nor
punished by a relevant document's weaker chunks further down.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def unique_in_order(ranked_document_ids: Iterable[str]) -> list[str]:
    """Document ids with repeats removed, each at its first position."""
    return list(dict.fromkeys(ranked_document_ids))


def reciprocal_rank(ranked_document_ids: Sequence[str], relevant: set[str]) -> float:
    """1 / rank of the first relevant document (rank 1 = first), 0.0 when none is ranked."""
    for rank, doc_id in enumerate(unique_in_order(ranked_document_ids), start=1):
        if doc_id in relevant:
            return 1.0 / rank
    return 0.0


def recall_at_k(ranked_document_ids: Sequence[str], relevant: set[str], k: int) -> float:
    """Fraction of the relevant documents among the first k distinct ranked documents."""
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    if not relevant:
        raise ValueError("relevant is empty: recall is undefined for a query without relevant documents")
    top = set(unique_in_order(ranked_document_ids)[:k])
    return len(top & set(relevant)) / len(relevant)


def fact_tracing_metrics(
    rankings: Mapping[str, Sequence[str]],
    relevant: Mapping[str, Iterable[str]],
    k: int = 10,
) -> dict[str, float | int]:
    """Mean reciprocal rank and recall@k over the queries in `rankings`.

    `relevant` maps query id to its relevant document ids and may hold more queries than
    were ranked (the ground truth of a whole corpus); every ranked query needs an entry.
    """
    if not rankings:
        raise ValueError("rankings is empty: score at least one query before evaluating")
    missing = [q for q in rankings if q not in relevant or not set(relevant[q])]
    if missing:
        raise ValueError(
            f"no relevant documents for {len(missing)} ranked queries (e.g. {missing[:3]}): "
            "rank only queries with ground truth, or add them to `relevant`"
        )
    rr = [reciprocal_rank(ranked, set(relevant[q])) for q, ranked in rankings.items()]
    rec = [recall_at_k(ranked, set(relevant[q]), k) for q, ranked in rankings.items()]
    return {"mrr": sum(rr) / len(rr), f"recall@{k}": sum(rec) / len(rec), "n_queries": len(rr)}


def states_value(completion: str, value: str) -> bool:
    """The completion starts with the value as a whole word (" Saltmere" in " Saltmere, where...")."""
    completion, value = completion.strip(), value.strip()
    return completion.startswith(value) and not completion[len(value) : len(value) + 1].isalnum()


def ranked_documents(
    scores: np.ndarray, query_ids: Sequence[str], document_ids: Sequence[str], depth: int
) -> dict[str, list[str]]:
    """Per query (a row of scores), the document ids of its `depth` best-scoring examples, best first.

    scores: [queries, examples]; document_ids: the document of each example (column).
    """
    order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]  # [queries, depth]
    return {q: [document_ids[i] for i in order[qi]] for qi, q in enumerate(query_ids)}


def trace_facts(
    rankings: Mapping[str, Mapping[str, Sequence[str]]],
    relevant: Mapping[str, Iterable[str]],
    k: int = 10,
) -> dict[str, dict[str, float]]:
    """Per method (or mode), MRR and recall@k of its rankings: method -> {"mrr", "recall@k"}.

    rankings: method -> query id -> ranked document ids, best first; from `ranked_documents` on a full
    score matrix (rank 5k deep: chunks of one document repeat) or from a scoring run's top-k.
    """
    out = {}
    for method, by_query in rankings.items():
        m = fact_tracing_metrics(by_query, relevant, k=k)
        out[method] = {"mrr": m["mrr"], f"recall@{k}": m[f"recall@{k}"]}
    return out


def trace_facts_in_scores(
    scores: Mapping[str, np.ndarray],
    query_ids: Sequence[str],
    document_ids: Sequence[str],
    relevant: Mapping[str, Iterable[str]],
    k: int = 10,
) -> dict[str, dict[str, float]]:
    """`trace_facts` of full score matrices (method -> [queries, examples]), each query ranked 5k deep."""
    return trace_facts(
        {method: ranked_documents(s, query_ids, document_ids, 5 * k) for method, s in scores.items()}, relevant, k
    )
