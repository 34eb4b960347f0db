"""Lexical and hybrid rankings: BM25's ranking taken to a fixed depth, reciprocal-rank fusion of BM25 with a gradient
mode (`hybrid-rrf-<mode>`), BM25's candidates reranked by their exact gradient scores (`hybrid-rerank-<mode>`), and the
query vectors a vector index is searched with for `hybrid-ann-<mode>` (whose candidates are reranked the same way).

A ranking here is one query's (example ids, scores), best first, equal scores by the smaller id: the order of
`dataworth.attribution.scoring.TopK`, so that every mode's top-k is the same whether it came from a streaming pass,
a full matrix or these functions. BM25 itself is computed by the index's full-text index (storage); its oracle is
`dataworth.evaluation.baselines.bm25`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dataworth.attribution.curvature import Curvature
from dataworth.attribution.scoring import prepare_queries, score_batch
from dataworth.config import GradientMode

Ranking = tuple[np.ndarray, np.ndarray]  # (example ids int64 [n], scores float64 [n]), best first


def ranked(ids, scores) -> Ranking:
    """(ids, scores) ordered by score, higher first, equal scores by the smaller id."""
    ids, scores = np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float64)
    order = np.lexsort((ids, -scores))
    return ids[order], scores[order]


def complete_ranking(ids, scores, n_examples: int, depth: int, universe: np.ndarray | None = None) -> Ranking:
    """The first `depth` entries (at most n_examples) of a ranking of every example: `ids` (the examples with a
    positive score, e.g. those sharing a word with a BM25 query), then the others at score 0 in id order.
    `universe` (sorted example ids, e.g. those a metadata filter keeps) stands for 0..n_examples-1 when given."""
    ids, scores = ranked(ids, scores)
    every = np.arange(n_examples, dtype=np.int64) if universe is None else np.asarray(universe, dtype=np.int64)
    depth = min(int(depth), len(every))
    if len(ids) >= depth:
        return ids[:depth], scores[:depth]
    rest = np.setdiff1d(every, ids, assume_unique=True)[: depth - len(ids)]
    return np.concatenate([ids, rest]), np.concatenate([scores, np.zeros(len(rest))])


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: float = 60.0) -> Ranking:
    """RRF of one query's rankings (example ids, best first): an example scores Σ 1/(k + rank) over the rankings
    that hold it (rank 1 = first); returned best first, equal scores by the smaller id.

    Only the ids a ranking holds count: cut each to the same depth (`candidates`) before fusing."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, example in enumerate(np.asarray(ranking, dtype=np.int64).tolist(), start=1):
            fused[example] = fused.get(example, 0.0) + 1.0 / (k + rank)
    return ranked(list(fused), list(fused.values()))


def linear_fusion(lexical: Ranking, exact: Ranking, weight: float) -> Ranking:
    """One query's BM25 candidates scored (1 - weight) × BM25 + weight × their exact gradient score, each min-max
    normalized over the candidates (0 at their lowest score, 1 at their highest; a score equal for every candidate
    is 0), as LanceDB's linear-combination reranker fuses its two searches, with both scores put on one scale.
    `lexical`: the candidates (ids, BM25 scores); `exact`: their exact gradient ranking (ids, scores, any order,
    the same ids)."""
    ids, lex = np.asarray(lexical[0], dtype=np.int64), np.asarray(lexical[1], dtype=np.float64)
    by_id = dict(zip(np.asarray(exact[0]).tolist(), np.asarray(exact[1], dtype=np.float64).tolist()))
    grad = np.array([by_id[i] for i in ids.tolist()], dtype=np.float64)

    def unit(x: np.ndarray) -> np.ndarray:
        span = x.max() - x.min() if len(x) else 0.0
        return (x - x.min()) / span if span > 0 else np.zeros_like(x)

    return ranked(ids, (1.0 - weight) * unit(lex) + weight * unit(grad))


def ann_query_vectors(
    queries: torch.Tensor, curvature: Curvature, mode: GradientMode, task: Curvature | None = None
) -> torch.Tensor:
    """[Q, dim] float32 vectors whose dot product with a stored g_i ranks the examples as `mode` does, or as near as
    one dot product can: dot g_q and influence (F+λI)^-1 g_q exactly; relatif and cosine divide by per-example
    norms ‖(F+λI)^-½ g_i‖ no vector index knows, so they search with influence's vector (their candidates are the
    examples of largest influence, reranked exactly); trackstar with (T+λI)^-1 g_q under its task curvature `task`
    (`Curvature.mixed` of the whole query set), its norms left out the same way."""
    q64 = queries.to(torch.float64)
    if mode == "dot":
        out = q64
    elif mode == "trackstar":
        if task is None:
            raise ValueError("trackstar's ANN query vectors need the task curvature (Curvature.mixed of the queries)")
        out = task.apply(q64, -1.0)
    else:
        out = curvature.apply(q64, -1.0)
    return out.to(torch.float32)


def recall_at_k(approximate: Sequence[np.ndarray], exact: Sequence[np.ndarray], k: int) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / |exact top-k| (each list cut at k)."""
    hits = [len(np.intersect1d(a[:k], e[:k])) / max(1, len(e[:k])) for a, e in zip(approximate, exact, strict=True)]
    return float(np.mean(hits)) if hits else 1.0


# score_candidates scores every query against every row read in one product when that costs at most this many times
# the scores asked for (Q × U ≤ ratio × Σ_q M_q), else each query against its own candidates' rows.
ONE_PRODUCT_RATIO = 4


def score_candidates(
    queries: torch.Tensor,
    curvature: Curvature,
    mode: GradientMode,
    candidates: Sequence[np.ndarray],
    train: torch.Tensor,
    norms: torch.Tensor | None = None,
    task: Curvature | None = None,
) -> list[np.ndarray]:
    """Each query's exact scores in a gradient mode against its own candidates only, in float64.

    queries [Q, dim]: query gradients; candidates[q]: positions of query q's candidates in `train` [U, dim] (the
    stored gradients of every query's candidates); norms [U]: their ‖(F+λI)^-1/2 g_i‖ (relatif and cosine),
    computed here when not given. The mode's formula is score_batch's, so a candidate's score is the one a full
    pass gives it (to the rounding of that pass's dtype). `task` is trackstar's curvature (`Curvature.mixed` of
    the run's whole query set; fitted on `queries` when not given)."""
    prepared = prepare_queries(queries, curvature, [mode], torch.float64, task=task)
    train = train.to(torch.float64)
    if prepared.needs_norms:
        norms = curvature.whitened_norms(train) if norms is None else norms.to(torch.float64)
    task_norms = None if prepared.task_curvature is None else prepared.task_curvature.whitened_norms(train)
    wanted = sum(len(p) for p in candidates)
    if len(candidates) * train.shape[0] <= ONE_PRODUCT_RATIO * wanted:
        # The queries share most of their candidates (a small corpus, common words): one product of every query
        # with every row read, then each query's own, beats a gather of each query's rows.
        every = score_batch(prepared, train, norms, task_norms)[mode]  # [Q, U]
        return [every[q, torch.as_tensor(np.asarray(p, dtype=np.int64))].numpy() for q, p in enumerate(candidates)]
    out = []
    for q, positions in enumerate(candidates):
        rows = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        scores = score_batch(
            prepared.take([q]),
            train[rows],
            None if norms is None else norms[rows],
            None if task_norms is None else task_norms[rows],
        )[mode]
        out.append(scores[0].numpy())  # [1, M] → [M]
    return out


def rerank(
    queries: torch.Tensor,
    curvature: Curvature,
    mode: GradientMode,
    candidates: Sequence[np.ndarray],
    candidate_ids: np.ndarray,
    train: torch.Tensor,
    norms: torch.Tensor | None = None,
    task: Curvature | None = None,
) -> list[Ranking]:
    """Each query's candidates (example ids) ranked by their exact scores in a gradient mode.

    candidate_ids [U]: the example ids of the rows of `train` [U, dim] (and `norms` [U]); candidates[q]: query q's
    candidate example ids, each one of candidate_ids."""
    order = np.argsort(candidate_ids, kind="stable")
    positions = [order[np.searchsorted(candidate_ids, c, sorter=order)] for c in candidates]
    scores = score_candidates(queries, curvature, mode, positions, train, norms, task)
    return [ranked(c, s) for c, s in zip(candidates, scores)]
