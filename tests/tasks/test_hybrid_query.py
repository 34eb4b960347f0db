"""bm25 and the hybrid score modes through the query tasks (`.fn`), against a temporary LanceDB directory: BM25
against the numpy oracle, RRF against an explicit computation, the rerank against the exact gradient scores of
the BM25 candidates, the sharded path against one task, and an index without a full-text index."""

from __future__ import annotations

import lancedb
import numpy as np
import pytest
import torch

from dataworth.attribution.scoring import Scorer
from dataworth.config import GenerationConfig, QuerySpec, ScoreConfig
from dataworth.evaluation.baselines.bm25 import BM25, tokenize_words
from storage import IndexStore, results_store
from storage.store import BM25_B, BM25_K1
from tasks.common import index_curvature, index_norms, index_query_gradients, open_index_model
from tasks.index import publish_index
from tasks.query import merge_scores, query_gradients, score_queries, score_shard_range

QUERIES = [
    QuerySpec(id="cats", prompt="Tova keeps three", completion=" grey cats"),
    QuerySpec(id="mill", prompt="The river runs past the", completion=" old mill"),
    QuerySpec(id="none", prompt="Zzz qqq", completion=" xxx"),  # shares no word with the corpus
]
MODES = ["bm25", "hybrid-rrf-influence", "hybrid-rerank-relatif", "hybrid-rerank-dot", "hybrid-linear-relatif", "dot"]


@pytest.fixture
def published(stages, index_config):
    cfg = index_config(precondition="none")
    cfg = cfg.model_copy(update={"logging": cfg.logging.model_copy(update={"shard_size": 2})})
    *_, manifest = stages.build(cfg)
    return cfg, publish_index.fn(cfg.index_uri, manifest).manifest


def _rows(store, srid):
    return sorted(
        (r["mode"], r["query_id"], r["rank"], r["example_id"], r["score"])
        for r in results_store(store.uri).read_scores(srid).to_pylist()
    )


def _top(rows, mode, query):
    return [(r[3], r[4]) for r in rows if r[0] == mode and r[1] == query]


def _exact(store, manifest, modes):
    """Every gradient mode's full matrix in float64, from the stored gradients and norms."""
    index = open_index_model(store)
    _, grads = index_query_gradients(index, QUERIES, GenerationConfig(), 2)
    curvature = index_curvature(store, manifest, None)
    norms = index_norms(store, manifest, curvature)
    scorer = Scorer(grads, curvature, modes, 1, manifest.num_examples, dtype=torch.float64, norms=norms)
    for ids, vectors, _ in store.iter_gradients(100):
        scorer.update(torch.tensor(ids), torch.tensor(vectors))
    return {m: v.numpy() for m, v in scorer.full.items()}


def _order(row, ids=None):
    """Example ids by score descending, then id (the TopK rule)."""
    ids = np.arange(len(row)) if ids is None else np.asarray(ids)
    return sorted(ids.tolist(), key=lambda i: (-row[i], i))


def test_bm25_and_hybrid_modes(published, tmp_path):
    cfg, manifest = published
    store = IndexStore(cfg.index_uri)
    n, m_cut, k = manifest.num_examples, 4, 3
    assert n > m_cut
    score = ScoreConfig(modes=MODES, top_k=k, candidates=m_cut, rrf_k=10, linear_weight=0.3, query_batch_size=2)
    path = tmp_path / "m.npz"
    scored = score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GenerationConfig(), str(path))
    rows = _rows(store, scored.score_run_id)
    assert {r[0] for r in rows} == set(MODES)
    assert all(len(_top(rows, m, q.id)) == k for m in MODES for q in QUERIES)
    full = np.load(path)
    assert full.files == [*MODES, "query_ids"]  # the modes asked for, not the influence that RRF streams

    # bm25 is the oracle's BM25 (k1=1.2, b=0.75) of prompt + completion against the examples' text, over the
    # examples that hold a word (an EOS-only chunk decodes to "": Lance's index leaves it out of N and avgdl).
    texts = store.read_examples(["example_id", "text"]).sort_by("example_id").column("text").to_pylist()
    worded = [i for i, t in enumerate(texts) if tokenize_words(t)]
    assert len(worded) < n  # the tiny corpus has such a chunk
    oracle = BM25([tokenize_words(texts[i]) for i in worded], k1=BM25_K1, b=BM25_B)
    bm25 = np.zeros((len(QUERIES), n))
    bm25[:, worded] = np.stack([oracle.scores(tokenize_words(q.prompt + q.completion)) for q in QUERIES])
    np.testing.assert_allclose(full["bm25"], bm25, rtol=2e-6, atol=0)
    assert not bm25[2].any()  # the query that shares no word: every example at 0, ranked by id
    for qi, q in enumerate(QUERIES):
        top = _top(rows, "bm25", q.id)
        assert [i for i, _ in top] == _order(full["bm25"][qi])[:k]
        np.testing.assert_allclose([s for _, s in top], bm25[qi, [i for i, _ in top]], rtol=2e-6)

    exact = _exact(store, manifest, ["influence", "relatif", "dot"])
    for qi, q in enumerate(QUERIES):
        candidates = _order(full["bm25"][qi])[:m_cut]
        # RRF of BM25's and influence's rankings, each cut at `candidates`, computed here by hand.
        fused = {}
        for ranking in (candidates, _order(exact["influence"][qi])[:m_cut]):
            for rank, example in enumerate(ranking, start=1):
                fused[example] = fused.get(example, 0.0) + 1.0 / (10 + rank)
        top = _top(rows, "hybrid-rrf-influence", q.id)
        assert [i for i, _ in top] == sorted(fused, key=lambda i: (-fused[i], i))[:k]
        assert [s for _, s in top] == pytest.approx([fused[i] for i, _ in top], abs=1e-15)
        row = np.zeros(n)
        row[list(fused)] = list(fused.values())
        np.testing.assert_allclose(full["hybrid-rrf-influence"][qi], row, atol=1e-15)
        # The rerank: BM25's candidates, ranked by their exact gradient scores; NaN (not scored) elsewhere.
        for mode, gradient in (("hybrid-rerank-relatif", "relatif"), ("hybrid-rerank-dot", "dot")):
            top = _top(rows, mode, q.id)
            assert [i for i, _ in top] == _order(exact[gradient][qi], candidates)[:k]
            np.testing.assert_allclose([s for _, s in top], exact[gradient][qi, [i for i, _ in top]], rtol=1e-12)
            got = full[mode][qi]
            assert np.flatnonzero(~np.isnan(got)).tolist() == sorted(candidates)
            np.testing.assert_allclose(got[candidates], exact[gradient][qi, candidates], rtol=1e-12)

        # The linear combination: the same candidates, 0.7 × BM25 + 0.3 × exact relatif, each min-max normalized
        # over the candidates (the query that shares no word: BM25 is 0 for all, so relatif alone orders them).
        def unit(x):
            return (x - x.min()) / (x.max() - x.min()) if x.max() > x.min() else np.zeros_like(x)

        c = np.array(candidates)
        row = np.full(n, np.nan)
        row[c] = 0.7 * unit(full["bm25"][qi, c]) + 0.3 * unit(exact["relatif"][qi, c])
        top = _top(rows, "hybrid-linear-relatif", q.id)
        assert [i for i, _ in top] == _order(row, candidates)[:k]
        np.testing.assert_allclose([s for _, s in top], row[[i for i, _ in top]], atol=1e-9)
        np.testing.assert_allclose(full["hybrid-linear-relatif"][qi], row, atol=1e-9)
        # dot itself is the streamed top-k, unchanged by the hybrid modes beside it.
        assert [i for i, _ in _top(rows, "dot", q.id)] == _order(exact["dot"][qi])[:k]


def test_only_bm25_and_reranks_stream_nothing(published, tmp_path):
    cfg, manifest = published
    score = ScoreConfig(modes=["bm25", "hybrid-rerank-cosine"], top_k=2, candidates=3)
    scored = score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GenerationConfig())
    assert scored.pairs == 0  # no pass over the gradients: only the candidates' rows were read
    rows = _rows(IndexStore(cfg.index_uri), scored.score_run_id)
    assert {r[0] for r in rows} == {"bm25", "hybrid-rerank-cosine"} and len(rows) == 2 * 3 * 2


@pytest.mark.parametrize("modes", [MODES, ["bm25", "hybrid-rerank-influence"]])
def test_sharded_scoring_equals_one_task(published, tmp_path, modes):
    cfg, manifest = published
    store = IndexStore(cfg.index_uri)
    gen = GenerationConfig()
    one = ScoreConfig(modes=modes, top_k=3, candidates=5, query_batch_size=1, train_batch_size=3)
    single = score_queries.fn(cfg.index_uri, manifest, QUERIES, one, gen, str(tmp_path / "one.npz"))
    expected = _rows(store, single.score_run_id)
    full = np.load(tmp_path / "one.npz")
    for per in (1, 3):
        score = one.model_copy(update={"shards_per_task": per})
        query = query_gradients.fn(cfg.index_uri, manifest, QUERIES, score, gen)
        ranges = [
            score_shard_range.fn(cfg.index_uri, manifest, query, score, shards, full_matrix=True)
            for shards in manifest.shard_ranges(per)
        ]
        path = tmp_path / f"sharded-{per}.npz"
        scored = merge_scores.fn(cfg.index_uri, manifest, query, score, ranges, str(path))
        assert scored.score_run_id == single.score_run_id and scored.pairs == single.pairs
        assert _rows(store, scored.score_run_id) == expected, per
        sharded = np.load(path)
        assert sharded.files == full.files
        for name in full.files:
            np.testing.assert_array_equal(sharded[name], full[name])


def test_an_index_without_a_text_index_fails_before_any_model_work(published, monkeypatch):
    cfg, manifest = published
    store = IndexStore(cfg.index_uri)
    # The examples table of an index built before the bm25 modes: rows without a full-text index.
    old = store.read_examples(version=manifest.examples_version)
    version = lancedb.connect(cfg.index_uri).create_table("examples", data=old, mode="overwrite").version
    manifest = manifest.model_copy(update={"examples_version": version})

    def no_model(*args, **kwargs):
        raise AssertionError("the model was opened before the missing text index was reported")

    monkeypatch.setattr("tasks.query.open_index_model", no_model)
    score = ScoreConfig(modes=["dot", "hybrid-rrf-dot"])
    with pytest.raises(ValueError, match="has no full-text index.*run `dataworth index` on it again"):
        score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GenerationConfig())
    with pytest.raises(ValueError, match="has no full-text index"):
        query_gradients.fn(cfg.index_uri, manifest, QUERIES, score, GenerationConfig())
