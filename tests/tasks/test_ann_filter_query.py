"""The hybrid-ann-* modes (LanceDB's vector index on the stored gradients, candidates reranked exactly) and the
metadata filters (where_source, where_document) through the query tasks (`.fn`) against a temporary LanceDB
directory: ANN + rerank against the exact top-k, filtered scores against the unfiltered ones restricted to the
matching examples in every mode, single-task and sharded, and the errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from pydantic import ValidationError

from dataworth.config import (
    ALL_SCORE_MODES,
    ANN_NPROBES,
    VECTOR_INDEX_TYPES,
    AnnConfig,
    GenerationConfig,
    QuerySpec,
    ScoreConfig,
)
from dataworth.fingerprint import model_fingerprint
from storage import IndexStore, IndexStoreError, results_store
from tasks.index import assemble_manifest, build_ann_index, fit_curvature, publish_index
from tasks.query import merge_scores, query_gradients, score_queries, score_shard_range

QUERIES = [
    QuerySpec(id="cats", prompt="Tova keeps three", completion=" grey cats"),
    QuerySpec(id="mill", prompt="The river runs past the", completion=" old mill"),
]
SOURCES = ["wiki", "news", "wiki", "news", "wiki", "news"]
GEN = GenerationConfig()


@pytest.fixture
def published(stages, index_config, texts, tmp_path):
    """A tiny index (shards of 2) over the task corpus with a `source` column, built as the index flow builds one
    with --ann.build: the vector index after the shards, curvature and manifest at its table version."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t, "src": s}) + "\n" for i, (t, s) in enumerate(zip(texts, SOURCES)))
    )
    cfg = index_config(precondition="none")
    cfg = cfg.model_copy(
        update={
            "logging": cfg.logging.model_copy(update={"shard_size": 2}),
            "data": cfg.data.model_copy(update={"dataset": str(docs), "source_column": "src"}),
            "ann": AnnConfig(build=True),
        }
    )
    tok = stages.tokenize(cfg)
    shards = stages.log_all(cfg, tok)
    built = build_ann_index.fn(cfg.index_uri, cfg.ann)
    assert built.gradients_version == IndexStore(cfg.index_uri).gradients_version()
    curv = fit_curvature.fn(cfg.index_uri, cfg.curvature, shards[0].layout, built.gradients_version)
    manifest = assemble_manifest.fn(
        cfg, tok, shards, built.gradients_version, curv, model_fingerprint(cfg.model), ann=built
    )
    return cfg, publish_index.fn(cfg.index_uri, manifest).manifest


def _rows(uri, srid):
    out: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in sorted(results_store(uri).read_scores(srid).to_pylist(), key=lambda r: r["rank"]):
        out.setdefault((r["mode"], r["query_id"]), []).append((r["example_id"], r["score"]))
    return out


def _order(row, ids):
    """Example ids by score descending, then id (the TopK rule)."""
    return sorted(np.asarray(ids).tolist(), key=lambda i: (-row[i], i))


def _full(cfg, manifest, modes, path):
    """Every mode's full score matrix of an unfiltered run (gradient modes in float32, as streamed)."""
    score = ScoreConfig(modes=modes, top_k=1, full_matrix=True, query_batch_size=2)
    score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GEN, str(path))
    return np.load(path)


def test_manifest_records_the_vector_index(published):
    cfg, manifest = published
    info = manifest.ann_index
    assert info["index_type"] == "IVF_RQ" and info["metric"] == "dot" and info["rows"] == manifest.num_examples
    assert info["partitions"] == 1 and info["sub_vectors"] is None  # √rows, at most rows / 256
    assert info["bits"] == 4
    # The build config (and so check_compatible and the gradients' fingerprint) does not hold ann.
    assert "ann" not in manifest.config.model_dump()
    # IVF_PQ: dim / 16 sub-vectors when 16 divides dim, else dim's largest divisor up to dim / 8.
    pq = IndexStore(cfg.index_uri).build_vector_index("IVF_PQ")
    assert pq["index_type"] == "IVF_PQ" and manifest.dim % pq["sub_vectors"] == 0
    dim = manifest.dim
    divisors = [d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0]
    assert pq["sub_vectors"] == (dim // 16 if dim % 16 == 0 else max(divisors))


@pytest.mark.parametrize("candidates", [None, 3])
def test_ann_with_rerank_equals_the_exact_top_k(published, tmp_path, candidates):
    """M ≥ rows: every example is a candidate, so the rerank is the exact top-k in every gradient mode (and the
    recall logged against the streamed exact modes is 1). M = k: the candidates are whatever the quantized index
    finds, but each is ranked by its exact score, and the recall logged is the overlap with the exact top-k."""
    cfg, manifest = published
    n, k = manifest.num_examples, 3
    ann = [f"hybrid-ann-{m}" for m in ALL_SCORE_MODES]
    score = ScoreConfig(modes=[*ALL_SCORE_MODES, *ann], top_k=k, candidates=candidates or n + 5, query_batch_size=2)
    scored = score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GEN)
    rows = _rows(cfg.index_uri, scored.score_run_id)
    full = _full(cfg, manifest, list(ALL_SCORE_MODES), tmp_path / "full.npz")
    for mode in ALL_SCORE_MODES:
        overlaps = []
        for qi, q in enumerate(QUERIES):
            exact, got = rows[(mode, q.id)], rows[(f"hybrid-ann-{mode}", q.id)]
            if candidates is None:
                assert [i for i, _ in got] == [i for i, _ in exact], (mode, q.id)
            # each candidate carries its exact score, best first
            np.testing.assert_allclose([s for _, s in got], full[mode][qi, [i for i, _ in got]], rtol=1e-4)
            assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
            overlaps.append(len({i for i, _ in got} & {i for i, _ in exact}) / k)
        assert scored.ann_recall[f"hybrid-ann-{mode}"] == pytest.approx(np.mean(overlaps))
    assert set(scored.ann_recall) == set(ann)
    if candidates is None:
        assert scored.ann_recall == {m: 1.0 for m in ann}
        assert scored.metrics()["recall_at_3.hybrid-ann-influence"] == 1.0
    # The top-k CSV's columns are those of every other mode.
    assert {len(v) for v in rows.values()} == {k}


@pytest.mark.parametrize("index_type", VECTOR_INDEX_TYPES)
def test_every_index_type_returns_every_row_when_asked_for_all(published, index_type):
    """Each vector index LanceDB builds here, searched for as many rows as the table holds, returns each query every
    example once (so their exact rerank is the exact top-k), nearest first by its own (quantized) distance."""
    cfg, manifest = published
    store = IndexStore(cfg.index_uri)
    info = store.build_vector_index(index_type)
    assert info["index_type"] == index_type and info["rows"] == manifest.num_examples
    assert (info["bits"] is not None) == (index_type == "IVF_RQ")
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((3, manifest.dim)).astype(np.float32)
    found = store.search_vectors(queries, manifest.num_examples, info["version"], nprobes=1)
    assert [sorted(ids.tolist()) for ids in found] == [list(range(manifest.num_examples))] * 3
    # exact=True: a flat scan, the exact nearest by dot product (the fallback of a query the index left short)
    rows, _ = store.read_gradients_by_id(np.arange(manifest.num_examples), info["version"])
    dots = queries.astype(np.float64) @ rows.astype(np.float64).T
    flat = store.search_vectors(queries, 3, info["version"], nprobes=1, exact=True)
    assert [ids.tolist() for ids in flat] == [np.argsort(-d, kind="stable")[:3].tolist() for d in dots]
    # The hits' Lance row ids, read back by row id: each query's rows are those of its example ids, in its order.
    for exact in (False, True):
        ids, row_ids = store.search_vector_rows(queries, 4, info["version"], nprobes=1, exact=exact)
        for i, r in zip(ids, row_ids, strict=True):
            assert len(i) == len(r) == 4 and r.dtype == np.uint64
            np.testing.assert_array_equal(store.read_gradients_by_row_id(r, info["version"]), rows[i])
        # every query's candidates at once, each row once: the sorted unique ids and their rows
        unique, vectors = store.read_candidate_rows(ids, row_ids, info["version"])
        np.testing.assert_array_equal(unique, np.unique(np.concatenate(ids)))
        np.testing.assert_array_equal(vectors, rows[unique])


def test_read_by_row_id_refuses_a_row_id_not_in_the_version(published):
    cfg, manifest = published
    store = IndexStore(cfg.index_uri)
    version = manifest.gradients_version
    _ids, row_ids = store.search_vector_rows(np.ones((1, manifest.dim), np.float32), 2, version, nprobes=1)
    twice = np.concatenate([row_ids[0][::-1], row_ids[0]])  # any order, a row twice
    got = store.read_gradients_by_row_id(twice, version)
    np.testing.assert_array_equal(got[:2], got[2:][::-1])
    with pytest.raises(IndexStoreError, match=r"no rows for row ids .*search and read the same one"):
        store.read_gradients_by_row_id(np.array([int(row_ids[0][0]) + (1 << 40)], np.uint64), version)


def test_prewarm_changes_neither_the_scores_nor_the_run_id(published, monkeypatch):
    """score.ann_prewarm loads the vector index in a background thread while the query gradients are taken: the
    same top-k and run id as without it, and the index was prewarmed (once, at the manifest's version)."""
    cfg, manifest = published
    calls = []
    real = IndexStore.prewarm_vector_index

    def spy(self, version):
        calls.append(version)
        return real(self, version)

    monkeypatch.setattr(IndexStore, "prewarm_vector_index", spy)
    ann = ["hybrid-ann-influence", "hybrid-ann-relatif"]
    runs = {}
    for prewarm in (True, False):
        score = ScoreConfig(modes=ann, top_k=3, candidates=4, ann_prewarm=prewarm)
        scored = score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GEN)
        runs[prewarm] = (scored.score_run_id, _rows(cfg.index_uri, scored.score_run_id))
    assert calls == [manifest.gradients_version]
    assert runs[True] == runs[False]
    # A run with no ANN mode prewarms nothing.
    score_queries.fn(cfg.index_uri, manifest, QUERIES, ScoreConfig(modes=["influence"], top_k=2), GEN)
    assert calls == [manifest.gradients_version]


def test_random_access_reads_switch_lances_scheduler_and_restore_it(published, monkeypatch):
    """The lite I/O scheduler (flat memory in scans) is set when the store is imported; a read by id switches to the
    standard one for its duration (Lance reads the setting per operation) and puts it back after."""
    import storage.store as store_module

    cfg, manifest = published
    monkeypatch.setattr(store_module, "_LITE_BY_US", True)
    monkeypatch.setenv("LANCE_USE_LITE_SCHEDULER", "1")
    store = IndexStore(cfg.index_uri)
    with store_module._random_access():
        assert os.environ["LANCE_USE_LITE_SCHEDULER"] == "0"
        with store_module._random_access():  # nested (another thread's read): still standard
            assert os.environ["LANCE_USE_LITE_SCHEDULER"] == "0"
        assert os.environ["LANCE_USE_LITE_SCHEDULER"] == "0"
    assert os.environ["LANCE_USE_LITE_SCHEDULER"] == "1"
    store.read_gradients_by_id(np.array([0, 1]), manifest.gradients_version)
    assert os.environ["LANCE_USE_LITE_SCHEDULER"] == "1"
    # A value the user set is never touched.
    monkeypatch.setattr(store_module, "_LITE_BY_US", False)
    with store_module._random_access():
        assert os.environ["LANCE_USE_LITE_SCHEDULER"] == "1"


def test_ann_alone_streams_nothing_and_logs_no_recall(published):
    cfg, manifest = published
    score = ScoreConfig(modes=["hybrid-ann-dot"], top_k=2, candidates=4)
    scored = score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GEN)
    assert scored.pairs == 0 and scored.ann_recall == {}
    assert {len(v) for v in _rows(cfg.index_uri, scored.score_run_id).values()} == {2}


def test_ann_without_a_vector_index_fails_before_any_model_work(published, monkeypatch):
    cfg, manifest = published
    old = manifest.model_copy(update={"gradients_version": manifest.gradients_version - 1, "ann_index": None})

    def no_model(*args, **kwargs):
        raise AssertionError("the model was opened before the missing vector index was reported")

    monkeypatch.setattr("tasks.query.open_index_model", no_model)
    score = ScoreConfig(modes=["dot", "hybrid-ann-dot"])
    for run in (score_queries.fn, query_gradients.fn):
        with pytest.raises(ValueError, match=r"has no vector index.*--ann.build"):
            run(cfg.index_uri, old, QUERIES, score, GEN)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_ann_on_a_dtype_lance_cannot_index_is_refused(index_config, dtype):
    cfg = index_config()
    with pytest.raises(ValidationError, match=r"ann.build with logging.storage_dtype.*--logging.storage-dtype float16"):
        type(cfg).model_validate(
            {
                **cfg.model_dump(),
                "logging": {**cfg.logging.model_dump(), "storage_dtype": dtype},
                "ann": {"build": True},
            }
        )


FILTERED_MODES = [
    *ALL_SCORE_MODES,
    "bm25",
    "hybrid-rrf-influence",
    "hybrid-rerank-dot",
    "hybrid-rerank-cosine",
    "hybrid-ann-influence",
    "hybrid-ann-relatif",
]


@pytest.mark.parametrize(
    "where",
    [
        {"where_source": ["news"]},
        {"where_document": ["d0", "d5"]},
        {"where_source": ["wiki"], "where_document": ["d0", "d1"]},
    ],
)
def test_filtered_scores_are_the_unfiltered_ones_restricted(published, tmp_path, where):
    cfg, manifest = published
    store = IndexStore(cfg.index_uri)
    examples = store.read_examples(["example_id", "document_id", "source"]).to_pylist()
    keep = sorted(
        e["example_id"]
        for e in examples
        if e["source"] in where.get("where_source", [e["source"]])
        and e["document_id"] in where.get("where_document", [e["document_id"]])
    )
    assert 2 <= len(keep) < manifest.num_examples
    k, m_cut = 2, 3
    full = _full(cfg, manifest, [*ALL_SCORE_MODES, "bm25"], tmp_path / "all.npz")
    score = ScoreConfig(modes=FILTERED_MODES, top_k=k, candidates=m_cut, rrf_k=10, query_batch_size=2, **where)
    single = score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GEN)
    assert single.examples_scored == len(keep) and single.metrics()["examples_scored"] == len(keep)
    rows = _rows(cfg.index_uri, single.score_run_id)
    for qi, q in enumerate(QUERIES):
        for mode in [*ALL_SCORE_MODES, "bm25"]:
            got = rows[(mode, q.id)]
            assert [i for i, _ in got] == _order(full[mode][qi], keep)[:k], (mode, q.id)
            np.testing.assert_allclose([s for _, s in got], full[mode][qi, [i for i, _ in got]], rtol=2e-5)
        bm25 = _order(full["bm25"][qi], keep)[:m_cut]
        fused: dict[int, float] = {}
        for ranking in (bm25, _order(full["influence"][qi], keep)[:m_cut]):
            for rank, example in enumerate(ranking, start=1):
                fused[example] = fused.get(example, 0.0) + 1.0 / (10 + rank)
        assert [i for i, _ in rows[("hybrid-rrf-influence", q.id)]] == sorted(fused, key=lambda i: (-fused[i], i))[:k]
        for gradient in ("dot", "cosine"):
            got = rows[(f"hybrid-rerank-{gradient}", q.id)]
            assert [i for i, _ in got] == _order(full[gradient][qi], bm25)[:k]
        for gradient in ("influence", "relatif"):
            got = rows[(f"hybrid-ann-{gradient}", q.id)]
            assert set(i for i, _ in got) <= set(keep)  # the filter holds for the vector search too
            np.testing.assert_allclose([s for _, s in got], full[gradient][qi, [i for i, _ in got]], rtol=2e-5)
            if len(keep) <= m_cut:  # every kept example is a candidate: the exact top-k
                assert [i for i, _ in got] == _order(full[gradient][qi], keep)[:k]
    # Sharded scoring: the same rows, the range tasks reading only the shards that hold kept examples.
    for per in (1, 2):
        sharded = score.model_copy(update={"shards_per_task": per})
        query = query_gradients.fn(cfg.index_uri, manifest, QUERIES, sharded, GEN)
        ranges = [
            score_shard_range.fn(cfg.index_uri, manifest, query, sharded, shards)
            for shards in manifest.shard_ranges(per)
        ]
        assert sum(r.rows for r in ranges) == len(keep)
        merged = merge_scores.fn(cfg.index_uri, manifest, query, sharded, ranges)
        assert merged.score_run_id == single.score_run_id
        assert _rows(cfg.index_uri, merged.score_run_id) == rows, per


def test_a_filter_matching_nothing_fails_before_any_model_work(published, monkeypatch):
    cfg, manifest = published

    def no_model(*args, **kwargs):
        raise AssertionError("the model was opened before the empty filter was reported")

    monkeypatch.setattr("tasks.query.open_index_model", no_model)
    score = ScoreConfig(modes=["dot"], where_source=["nowhere"])
    for run in (score_queries.fn, query_gradients.fn):
        with pytest.raises(ValueError, match=r"no example of the index matches where_source=\['nowhere'\]"):
            run(cfg.index_uri, manifest, QUERIES, score, GEN)


def test_filter_config_errors():
    with pytest.raises(ValidationError, match="an empty filter matches nothing"):
        ScoreConfig(where_document=[])
    with pytest.raises(ValidationError, match="full_matrix with where_source/where_document"):
        ScoreConfig(where_source=["a"], full_matrix=True)
    # Defaults leave the dumps (and so the score run ids of older configs) unchanged.
    assert ScoreConfig().model_dump() == ScoreConfig(ann_nprobes=ANN_NPROBES, ann_refine_factor=None).model_dump()
    assert "where_source" not in ScoreConfig().model_dump()
