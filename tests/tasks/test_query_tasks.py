"""Query task bodies (`.fn`) and the shared index-model helpers, against a temporary LanceDB directory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataworth.attribution.scoring import Scorer
from dataworth.config import GenerationConfig, QuerySpec, ScoreConfig
from storage import IndexStore, results_store
from tasks.common import (
    compute_norms,
    index_curvature,
    index_query_gradients,
    norms_key,
    open_index_model,
    prefetched,
    read_norms,
    store_norms,
)
from tasks.index import publish_index
from tasks.query import (
    Report,
    Scored,
    merge_scores,
    merge_topk,
    query_gradients,
    render_report,
    score_queries,
    score_shard_range,
)

QUERIES = [
    QuerySpec(id="cats", prompt="Tova keeps three", completion=" grey cats"),
    QuerySpec(id="gen", prompt="Bread is baked"),
]


@pytest.fixture
def published(stages, index_config):
    cfg = index_config(precondition="none")
    *_, manifest = stages.build(cfg)
    return cfg, publish_index.fn(cfg.index_uri, manifest).manifest


def test_open_index_model_and_query_gradients(published):
    cfg, manifest = published
    index = open_index_model(cfg.index_uri)
    assert index.manifest == manifest and index.projections is None
    assert type(index.model).__name__ == "GPT2LMHeadModel"
    encoded, grads = index_query_gradients(index, QUERIES, GenerationConfig(), 2)
    assert [q.id for q in encoded] == ["cats", "gen"] and not encoded[0].generated and encoded[1].generated
    assert grads.shape == (2, manifest.dim)
    fresh = open_index_model(IndexStore(cfg.index_uri), fresh=True)
    assert fresh.model is not index.model  # a private copy, safe to train
    with pytest.raises(ValueError, match="no published index"):
        open_index_model(cfg.index_uri + "-missing")


def test_score_queries_stores_top_k_of_every_mode(published, tmp_path):
    cfg, manifest = published
    score = ScoreConfig(top_k=3, query_batch_size=1)
    matrix = tmp_path / "m" / "score-matrix.npz"
    scored = score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GenerationConfig(), str(matrix))
    assert isinstance(scored, Scored) and scored.queries == 2
    assert scored.pairs > 0 and scored.compute_seconds == scored.query_gradient_seconds + scored.score_seconds
    assert set(scored.metrics()) == {
        "queries",
        "query_gradient_seconds",
        "score_seconds",
        "score_pairs_per_s",
        "score_pairs",
    }
    store = IndexStore(cfg.index_uri)
    results = results_store(cfg.index_uri)  # scores go to the results store beside the index, never into it
    scores = results.read_scores(scored.score_run_id).to_pylist()
    assert len(scores) == len(score.modes) * 2 * 3
    assert {r["index_version"] for r in scores} == {manifest.gradients_version}
    queries = {q["query_id"]: q for q in results.read_queries(scored.score_run_id).to_pylist()}
    assert queries["gen"]["generated"] and not queries["cats"]["generated"]

    # The stored top-k equal an in-memory scoring of the same gradients.
    index = open_index_model(store)
    _, grads = index_query_gradients(index, QUERIES, GenerationConfig(), 1)
    scorer = Scorer(grads, index_curvature(store, manifest, None), ["influence"], top_k=3)
    for ids, vectors, _ in store.iter_gradients(100):
        scorer.update(torch.tensor(ids), torch.tensor(vectors))
    cats = sorted((r for r in scores if r["mode"] == "influence" and r["query_id"] == "cats"), key=lambda r: r["rank"])
    assert [r["example_id"] for r in cats] == scorer.topk["influence"].ids[0].tolist()
    full = np.load(matrix)
    assert full["influence"].shape == (2, manifest.num_examples) and full["query_ids"].tolist() == ["cats", "gen"]

    again = score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GenerationConfig())
    assert again.score_run_id == scored.score_run_id  # the same run is rewritten, not duplicated
    assert results.read_scores(scored.score_run_id).num_rows == len(scores)


def _all_gradients(store):
    ids, vectors, _ = zip(*store.iter_gradients(5))
    return torch.tensor(np.concatenate(ids)), torch.tensor(np.concatenate(vectors), dtype=torch.float64)


def test_damping_override_computes_and_stores_its_own_norms(published, tmp_path):
    cfg, manifest = published
    store = IndexStore(cfg.index_uri)
    own = index_curvature(store, manifest, None)
    assert read_norms(store, norms_key(manifest.curvature_artifact, own)) is not None  # stored by fit_curvature
    other = index_curvature(store, manifest, 0.7)
    key = norms_key(manifest.curvature_artifact, other)
    assert read_norms(store, key) is None
    score = ScoreConfig(top_k=3, damping_factor=0.7, modes=["influence", "relatif", "cosine"], train_batch_size=3)
    first = tmp_path / "first.npz"
    score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GenerationConfig(), str(first))

    ids, G = _all_gradients(store)
    assert read_norms(store, key) is None  # a query never writes the index: the norms went to its results store
    stored = read_norms(results_store(cfg.index_uri), key)
    inverse = torch.linalg.inv(other.matrix(1.0))
    assert np.allclose(stored[ids.numpy()], torch.sqrt(torch.einsum("nd,de,ne->n", G, inverse, G)).numpy(), rtol=1e-6)
    # The stored-norm path scores as the per-batch one (norms computed again from every stored batch).
    _, grads = index_query_gradients(open_index_model(store), QUERIES, GenerationConfig(), 1)
    old = Scorer(grads, other, score.modes, 3, full_matrix_size=manifest.num_examples, dtype=torch.float64)
    old.update(ids, G)
    full = np.load(first)
    for mode in score.modes:
        expected = old.full[mode].numpy()  # float32 matmuls against a float64 reference
        assert np.abs(full[mode] - expected).max() <= 1e-5 * np.abs(expected).max(), mode

    # The next run with that damping reads the stored norms instead of computing them: with norms of 1
    # relatif is influence.
    store_norms(results_store(cfg.index_uri), key, np.ones(manifest.num_examples))
    second = tmp_path / "second.npz"
    score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GenerationConfig(), str(second))
    full = np.load(second)
    assert np.array_equal(full["relatif"], full["influence"])


def test_prefetched_keeps_order_and_raises_the_readers_error():
    assert list(prefetched(iter(range(10)), depth=1)) == list(range(10))

    def broken():
        yield 1
        raise OSError("disk gone")

    batches = prefetched(broken())
    assert next(batches) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(batches)
    early = prefetched(iter(range(1000)), depth=1)
    assert next(early) == 0
    early.close()  # a consumer that stops early releases the reader thread


def test_render_report_writes_html_and_csv(published, tmp_path):
    cfg, manifest = published
    scored = score_queries.fn(cfg.index_uri, manifest, QUERIES, ScoreConfig(top_k=2), GenerationConfig())
    report = render_report.fn(
        cfg.index_uri, scored.score_run_id, str(tmp_path / "r"), "title", {"index": cfg.index_uri}, {"cats": ["d1"]}
    )
    assert isinstance(report, Report) and report.files == [report.report, report.topk_csv]
    html = open(report.report).read()
    assert "grey cats" in html and "Bread is baked" in html
    lines = open(report.topk_csv).read().splitlines()
    assert lines[0] == '"mode","query_id","rank","score","example_id","document_id","source","relevant"'
    assert len(lines) == 1 + len(ScoreConfig().modes) * 2 * 2


def test_merge_topk_orders_by_score_then_smaller_id():
    a = (np.array([[4, 7, 2]]), np.array([[3.0, 1.0, 1.0]]))
    b = (np.array([[5, 1]]), np.array([[3.0, 1.0]]))
    ids, scores = merge_topk([a, b], 4)
    assert ids.tolist() == [[4, 5, 1, 2]] and scores.tolist() == [[3.0, 3.0, 1.0, 1.0]]
    ids, scores = merge_topk([(np.empty((1, 0), np.int64), np.empty((1, 0))), b], 3)
    assert ids.tolist() == [[5, 1]]


@pytest.fixture
def tied(stages, index_config):
    """A published index in shards of 2 whose gradients hold exact ties: shard 2 repeats shard 0's vectors and two
    rows of different shards are zero; norms are stored for the rewritten gradients."""
    cfg = index_config(precondition="none")
    cfg = cfg.model_copy(update={"logging": cfg.logging.model_copy(update={"shard_size": 2})})
    *_, manifest = stages.build(cfg)
    manifest = publish_index.fn(cfg.index_uri, manifest).manifest
    store = IndexStore(cfg.index_uri)
    rows = {s: next(store.iter_gradients(100, shards=[s]))[:2] for s in range(4)}
    assert all(len(ids) == 2 for ids, _ in rows.values())
    store.write_gradient_shard(2, rows[2][0], rows[0][1])
    for s, r in ((1, 0), (3, 1)):
        vectors = rows[s][1].copy()
        vectors[r] = 0
        store.write_gradient_shard(s, rows[s][0], vectors)
    manifest = manifest.model_copy(update={"gradients_version": store.gradients_version()})
    curvature = index_curvature(store, manifest, None)
    store_norms(store, norms_key(manifest.curvature_artifact, curvature), compute_norms(store, curvature, None))
    return cfg, manifest


def _stored(store, srid):
    rows = results_store(store.uri).read_scores(srid).to_pylist()
    return sorted((r["mode"], r["query_id"], r["rank"], r["example_id"], r["score"]) for r in rows)


@pytest.mark.parametrize("top_k", [3, 100])
def test_sharded_scoring_equals_one_task_including_ties(tied, tmp_path, top_k):
    cfg, manifest = tied
    store = IndexStore(cfg.index_uri)
    gen = GenerationConfig()
    one = ScoreConfig(top_k=top_k, query_batch_size=1, train_batch_size=3)
    single = score_queries.fn(cfg.index_uri, manifest, QUERIES, one, gen, str(tmp_path / "one.npz"))
    expected, expected_queries = (
        _stored(store, single.score_run_id),
        results_store(cfg.index_uri).read_queries(single.score_run_id),
    )
    full = np.load(tmp_path / "one.npz")
    # The ties are real: equal scores at different ids, stored smaller id first.
    dups = [(a, b) for a, b in zip(expected, expected[1:]) if a[:2] == b[:2] and a[4] == b[4] and a[3] != b[3]]
    assert dups and all(a[3] < b[3] for a, b in dups)

    for per in (1, 2, 3, 100):
        score = one.model_copy(update={"shards_per_task": per})
        query = query_gradients.fn(cfg.index_uri, manifest, QUERIES, score, gen)
        assert query.score_run_id == single.score_run_id  # the same run, however it is split
        ranges = [
            score_shard_range.fn(cfg.index_uri, manifest, query, score, shards, full_matrix=True)
            for shards in manifest.shard_ranges(per)
        ]
        assert [s for r in ranges for s in r.shards] == list(range(-(-manifest.num_examples // 2)))
        assert all(len(r.shards) <= per for r in ranges)
        path = tmp_path / f"sharded-{per}.npz"
        scored = merge_scores.fn(cfg.index_uri, manifest, query, score, ranges, str(path))
        assert scored.score_run_id == single.score_run_id and scored.pairs == single.pairs
        assert scored.queries == single.queries and set(scored.metrics()) == set(single.metrics())
        assert _stored(store, scored.score_run_id) == expected, per
        assert results_store(cfg.index_uri).read_queries(scored.score_run_id).equals(expected_queries)
        sharded = np.load(path)
        assert sharded.files == full.files
        for name in full.files:
            assert np.array_equal(sharded[name], full[name]), (per, name)
