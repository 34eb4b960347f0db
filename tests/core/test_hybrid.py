"""The hybrid rankings: BM25's ranking completed to a depth, reciprocal-rank fusion against an explicit computation,
and the rerank of candidates against the full matrix of each gradient mode (fp64)."""

import numpy as np
import pytest
import torch

from dataworth.attribution import hybrid
from dataworth.attribution.curvature import FisherAccumulator
from dataworth.attribution.hybrid import (
    complete_ranking,
    linear_fusion,
    ranked,
    reciprocal_rank_fusion,
    rerank,
    score_candidates,
)
from dataworth.attribution.projection import Block, Layout
from dataworth.attribution.scoring import Scorer, prepare_queries
from dataworth.config import (
    ALL_MODES,
    ALL_SCORE_MODES,
    HYBRID_MODES,
    CurvatureConfig,
    ScoreConfig,
    gradient_modes,
    hybrid_parts,
)
from dataworth.errors import ConfigError

LAYOUT = Layout((Block("a", 2, 3, 0), Block("b", 2, 2, 6)))


def test_ranked_and_complete_ranking():
    ids, scores = ranked([4, 2, 9, 1], [0.5, 2.0, 0.5, 3.0])
    assert ids.tolist() == [1, 2, 4, 9] and scores.tolist() == [3.0, 2.0, 0.5, 0.5]  # ties: smaller id first
    ids, scores = complete_ranking([7, 3], [1.0, 2.0], n_examples=10, depth=5)
    assert ids.tolist() == [3, 7, 0, 1, 2] and scores.tolist() == [2.0, 1.0, 0.0, 0.0, 0.0]
    ids, _ = complete_ranking([7, 3, 5], [1.0, 2.0, 3.0], n_examples=10, depth=2)
    assert ids.tolist() == [5, 3]
    ids, _ = complete_ranking([], [], n_examples=3, depth=10)  # a query sharing no word: every example, by id
    assert ids.tolist() == [0, 1, 2]


def test_rrf_equals_an_explicit_computation_from_the_two_rankings():
    rng = np.random.default_rng(0)
    for k in (60.0, 1.0, 0.0):
        a = rng.permutation(50)[:12]
        b = rng.permutation(50)[:12]
        explicit = {}
        for ranking in (a, b):
            for position, example in enumerate(ranking):
                explicit[int(example)] = explicit.get(int(example), 0.0) + 1.0 / (k + position + 1)
        ids, scores = reciprocal_rank_fusion([a, b], k)
        assert sorted(ids.tolist()) == sorted(explicit)
        assert scores.tolist() == pytest.approx([explicit[i] for i in ids.tolist()], abs=1e-15)
        order = sorted(explicit, key=lambda i: (-explicit[i], i))
        assert ids.tolist() == order
    # Two examples swapped between the lists tie exactly; the smaller id goes first, whichever list leads.
    for lists in ([[5, 2], [2, 5]], [[2, 5], [5, 2]]):
        ids, scores = reciprocal_rank_fusion(lists, 60)
        assert ids.tolist() == [2, 5] and scores[0] == scores[1] == pytest.approx(1 / 61 + 1 / 62)


def _fitted(seed=0):
    torch.manual_seed(seed)
    G = torch.randn(40, LAYOUT.dim, dtype=torch.float64)
    Q = torch.randn(5, LAYOUT.dim, dtype=torch.float64)
    acc = FisherAccumulator(LAYOUT, CurvatureConfig(kind="raw", damping_factor=0.1))
    acc.update(G)
    return G, Q, acc.finalize()


@pytest.mark.parametrize("one_product", [False, True], ids=["per-query rows", "one product"])
@pytest.mark.parametrize("mode", ALL_SCORE_MODES)
def test_rerank_equals_the_exact_scores_restricted_to_the_candidates(mode, one_product, monkeypatch):
    # Both ways of scoring the candidates: each query against its own rows, or every query against every row read.
    monkeypatch.setattr(hybrid, "ONE_PRODUCT_RATIO", 10**9 if one_product else 0)
    G, Q, curv = _fitted()
    full = Scorer(Q, curv, [mode], top_k=1, full_matrix_size=G.shape[0], dtype=torch.float64)
    full.update(torch.arange(G.shape[0]), G)
    matrix = full.full[mode].numpy()
    rng = np.random.default_rng(1)
    candidates = [rng.permutation(G.shape[0])[:8] for _ in range(Q.shape[0])]
    # The rows of every query's candidates, in an order of their own (as read from the table by id).
    union = rng.permutation(np.unique(np.concatenate(candidates)))
    ranking = rerank(Q, curv, mode, candidates, union, G[torch.from_numpy(union)])
    for q, (ids, scores) in enumerate(ranking):
        assert sorted(ids.tolist()) == sorted(candidates[q].tolist())
        np.testing.assert_allclose(scores, matrix[q, ids], rtol=1e-12, atol=1e-12)
        assert list(ids) == sorted(ids, key=lambda i: (-matrix[q, i], i))
    # Stored norms give the same scores as norms computed from the rows.
    norms = curv.whitened_norms(G)
    got = score_candidates(Q, curv, mode, [np.arange(8)] * Q.shape[0], G[:8], norms[:8])
    np.testing.assert_allclose(np.stack(got), matrix[:, :8], rtol=1e-12, atol=1e-12)


def test_prepared_queries_take_keeps_each_mode():
    G, Q, curv = _fitted()
    prepared = prepare_queries(Q, curv, list(ALL_SCORE_MODES), torch.float64)
    part = prepared.take([3, 1])
    assert part.n_queries == 2
    assert torch.equal(part.stacked[part.plain], Q[[3, 1]])
    assert torch.equal(part.stacked[part.inverse], prepared.stacked[prepared.inverse][[3, 1]])
    assert torch.equal(part.query_scale, prepared.query_scale[[3, 1]])


def test_linear_fusion_is_the_weighted_sum_of_min_max_scores():
    lexical = (np.array([7, 3, 5, 9]), np.array([4.0, 2.0, 2.0, 1.0]))  # BM25's candidates, best first
    exact = (np.array([9, 5, 7, 3]), np.array([3.0, -1.0, 0.0, 1.0]))  # their gradient scores, any order
    ids, scores = linear_fusion(lexical, exact, 0.25)
    # min-max: BM25 7 → 1, 3 → 1/3, 5 → 1/3, 9 → 0; gradient 9 → 1, 5 → 0, 7 → 1/4, 3 → 1/2
    want = {7: 0.75 + 0.0625, 3: 0.25 + 0.125, 5: 0.25, 9: 0.25}
    assert ids.tolist() == [7, 3, 5, 9]  # 5 and 9 tie at 0.25: the smaller id first
    np.testing.assert_allclose(scores, [want[i] for i in ids.tolist()], atol=1e-15)
    # weight 0 is BM25's order, 1 the gradient's; a score equal for every candidate counts 0
    assert linear_fusion(lexical, exact, 0.0)[0].tolist() == [7, 3, 5, 9]
    assert linear_fusion(lexical, exact, 1.0)[0].tolist() == [9, 3, 7, 5]
    flat = linear_fusion((lexical[0], np.zeros(4)), exact, 0.5)
    assert flat[0].tolist() == [9, 3, 7, 5] and flat[1].max() == 0.5


def test_mode_names_and_config_checks():
    kinds = ("rrf", "rerank", "linear", "ann")
    assert set(HYBRID_MODES) == {f"hybrid-{k}-{m}" for k in kinds for m in ALL_SCORE_MODES}
    assert hybrid_parts("hybrid-linear-relatif") == ("linear", "relatif")
    assert set(ALL_MODES) == {*ALL_SCORE_MODES, "bm25", *HYBRID_MODES}
    assert hybrid_parts("hybrid-rerank-influence") == ("rerank", "influence")
    assert hybrid_parts("bm25") is None and hybrid_parts("dot") is None
    # RRF streams its gradient mode; a rerank reads only its candidates' rows.
    modes = ["bm25", "hybrid-rrf-relatif", "hybrid-rerank-cosine", "dot"]
    assert gradient_modes(modes) == ["relatif", "dot"]
    assert gradient_modes(modes, kinds=("rrf", "rerank")) == ["relatif", "cosine", "dot"]
    assert ScoreConfig(modes=["hybrid-rerank-dot"], top_k=5, candidates=5).candidates == 5
    with pytest.raises(ValueError, match="candidates=4 is below top_k=5"):
        ScoreConfig(modes=["hybrid-rerank-dot"], top_k=5, candidates=4)
    ScoreConfig(modes=["bm25", "dot"], top_k=5, candidates=4)  # no hybrid mode: candidates unused
    with pytest.raises(ValueError, match="Input should be 'dot'"):
        ScoreConfig(modes=["hybrid-rrf-nope"])
    # Defaults stay out of the dump: the score run ids of earlier configs are unchanged.
    assert "candidates" not in ScoreConfig().model_dump() and "rrf_k" not in ScoreConfig().model_dump()
    assert ScoreConfig(candidates=50, rrf_k=10).model_dump()["candidates"] == 50
    _, Q, curv = _fitted()
    with pytest.raises(ConfigError, match="needs an index's full-text index"):
        prepare_queries(Q, curv, ["bm25"])
