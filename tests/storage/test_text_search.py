"""BM25 from the examples table's full-text index (LanceDB) against the numpy oracle
(dataworth.evaluation.baselines.bm25), versions, an index without one, and reading gradient rows by id."""

from __future__ import annotations

import lancedb
import numpy as np
import pyarrow as pa
import pytest

import storage.store
from dataworth.evaluation.baselines.bm25 import BM25, tokenize_words
from dataworth.evaluation.lds import spearman
from storage import IndexStore, IndexStoreError
from storage.schemas import examples_schema
from storage.store import BM25_B, BM25_K1


def _examples(texts: list[str], offset: int = 0) -> pa.Table:
    ids = np.arange(offset, offset + len(texts))
    return pa.table(
        {
            "example_id": ids,
            "document_id": [f"doc{i}" for i in ids],
            "chunk_index": np.zeros(len(ids), dtype=np.int32),
            "token_start": np.zeros(len(ids), dtype=np.int32),
            "token_end": np.full(len(ids), 4, dtype=np.int32),
            "num_tokens": np.full(len(ids), 4, dtype=np.int32),
            "text": texts,
            "source": [None] * len(ids),
            "input_ids": [[1, 2, 3, 4]] * len(ids),
            "label_mask": [None] * len(ids),
        },
        schema=examples_schema(),
    )


def _corpus(seed=0, n_docs=60, vocab=40) -> list[str]:
    """Zipf-like words (a few in most documents, a long tail), with case, punctuation, digits and underscores
    the tokenizers must split alike."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocab)] + ["Été", "naïve", "x_y", "it's", "2nd-best"]
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    seps = [" ", ", ", ". ", " - ", "; ", "\n"]
    return [
        "".join(w + seps[rng.integers(len(seps))] for w in rng.choice(words, size=rng.integers(1, 25), p=p))
        for _ in range(n_docs)
    ]


def _queries(seed=1, n=25) -> list[str]:
    rng = np.random.default_rng(seed)
    words = [f"W{i}" for i in range(40)] + ["été", "NAÏVE", "y", "it", "s", "2nd", "unseen"]
    return [" ".join(rng.choice(words, size=rng.integers(1, 7))) for _ in range(n)] + ["w3 w3 w5", "", "?!"]


@pytest.fixture
def store(tmp_path):
    return IndexStore(str(tmp_path / "index"))


def test_tokenizers_agree_on_the_words():
    texts = _corpus()
    oracle = BM25([tokenize_words(t) for t in texts], k1=BM25_K1, b=BM25_B)
    assert {"x", "y", "it", "s", "2nd", "best", "été", "naïve"} <= set(oracle.idf)  # split at _ ' - and kept é, ï


def test_bm25_equals_the_oracle_where_parameters_match(store):
    """Lance's BM25 is the oracle's with k1=1.2, b=0.75: every score equal to float32 rounding, the same examples
    matched, the same order (ties by id) — including a repeated query word, which counts twice."""
    texts = _corpus()
    version = store.write_examples(_examples(texts))
    oracle = BM25([tokenize_words(t) for t in texts], k1=BM25_K1, b=BM25_B)
    queries = _queries()
    hits = store.search_text(queries, limit=len(texts), version=version)
    assert len(hits) == len(queries)
    for query, (ids, scores) in zip(queries, hits):
        expected = oracle.scores(tokenize_words(query))
        matched = np.flatnonzero(expected > 0)
        assert sorted(ids.tolist()) == matched.tolist(), query
        np.testing.assert_allclose(scores, expected[ids], rtol=2e-6, atol=0)
        # Ranked as the oracle ranks them, up to float32 rounding of near-equal scores.
        assert (expected[ids][:-1] >= expected[ids][1:] * (1 - 2e-6)).all(), query
    assert hits[-1][0].size == 0 and hits[-2][0].size == 0  # no words, no matches
    ids, scores = store.search_text(["w0 w1"], limit=3, version=version)[0]
    assert len(ids) == 3 and scores[0] >= scores[1] >= scores[2]


def test_searches_run_at_once_give_the_serial_answers_in_order(store, monkeypatch):
    texts = _corpus()
    version = store.write_examples(_examples(texts))
    queries = _queries() * 3
    threads = []
    real = storage.store.ThreadPoolExecutor
    monkeypatch.setattr(storage.store, "ThreadPoolExecutor", lambda n, **k: threads.append(n) or real(n, **k))
    monkeypatch.setattr(storage.store.os, "cpu_count", lambda: 4)
    together = store.search_text(queries, limit=len(texts), version=version)
    assert threads == [4]
    monkeypatch.setattr(storage.store, "_TEXT_SEARCH_THREADS", 1)
    serial = store.search_text(queries, limit=len(texts), version=version)
    assert threads == [4]  # no pool the second time
    assert len(together) == len(serial) == len(queries)
    for (ids_t, scores_t), (ids_s, scores_s) in zip(together, serial, strict=True):
        assert ids_t.tolist() == ids_s.tolist() and scores_t.tolist() == scores_s.tolist()
    with pytest.raises(IndexStoreError, match="takes strings, got int"):
        store.search_text(["red", 3], 10, version)  # refused before any search


def test_bm25_ranks_like_the_oracle_at_its_own_parameters(store):
    """The oracle's default k1=1.5 weighs a repeated word more than Lance's 1.2: the scores differ, the rankings
    hardly (per query Spearman over the matched examples, top-1 the same)."""
    texts = _corpus(seed=3)
    store.write_examples(_examples(texts))
    oracle = BM25([tokenize_words(t) for t in texts])  # k1=1.5, b=0.75
    rhos, same_top = [], 0
    queries = [q for q in _queries(seed=4) if tokenize_words(q)]
    for query, (ids, scores) in zip(queries, store.search_text(queries, limit=len(texts))):
        expected = oracle.scores(tokenize_words(query))
        if len(ids) > 2:
            rhos.append(spearman(scores, expected[ids]))
        same_top += ids[0] == np.argmax(expected) if len(ids) else 1
    assert np.mean(rhos) > 0.99 and min(rhos) > 0.95, rhos
    assert same_top >= len(queries) - 2


def test_an_example_without_words_is_left_out_of_the_statistics(store):
    """Lance indexes the examples that hold a word: an empty text (an EOS-only chunk) counts in neither N nor
    avgdl, where the oracle counts every document it is given."""
    texts = ["red fox runs", "", "blue bird", "red red bird sings", "..."]
    store.write_examples(_examples(texts))
    ids, scores = store.search_text(["red bird"], 10)[0]
    worded = [0, 2, 3]
    oracle = BM25([tokenize_words(texts[i]) for i in worded], k1=BM25_K1, b=BM25_B)
    expected = dict(zip(worded, oracle.scores(["red", "bird"])))
    assert sorted(ids.tolist()) == worded
    np.testing.assert_allclose(scores, [expected[i] for i in ids], rtol=2e-6)
    everyone = BM25([tokenize_words(t) for t in texts], k1=BM25_K1, b=BM25_B).scores(["red", "bird"])
    assert not np.allclose(scores, everyone[ids], rtol=1e-3)


def test_each_version_searches_its_own_text(store):
    v1 = store.write_examples(_examples(["the red fox", "a blue bird"]))
    v2 = store.write_examples(_examples(["green tea", "red tea", "black tea"], offset=10))
    assert store.search_text(["red"], 10, v1)[0][0].tolist() == [0]
    assert store.search_text(["red"], 10, v2)[0][0].tolist() == [11]
    assert store.search_text(["red"], 10)[0][0].tolist() == [11]  # the latest
    names = [i.name for i in store._open("examples").list_indices()]
    assert {"document_idx", "text_idx"} <= set(names)


def test_an_examples_table_without_the_index_says_how_to_add_it(store, tmp_path):
    # An index built before the bm25 modes: its examples table was written without a full-text index.
    lancedb.connect(store.uri).create_table("examples", data=_examples(["some text"]))
    with pytest.raises(IndexStoreError, match=r"has no full-text index.* run `dataworth index` on it again"):
        store.check_text_index()
    with pytest.raises(IndexStoreError, match="no full-text index"):
        store.search_text(["text"], 5)
    with pytest.raises(IndexStoreError, match="limit must be a positive int"):
        store.search_text(["text"], 0)


def test_read_gradients_by_id(store):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(12, 4)).astype(np.float32)
    for shard in range(3):
        store.write_gradient_shard(shard, np.arange(shard * 4, shard * 4 + 4), vectors[shard * 4 : shard * 4 + 4])
    version = store.gradients_version()
    got, sq = store.read_gradients_by_id(np.array([9, 0, 5, 0]), version)  # any order, an id twice
    np.testing.assert_array_equal(got, vectors[[9, 0, 5, 0]])
    np.testing.assert_allclose(sq, np.square(vectors[[9, 0, 5, 0]]).sum(axis=1), rtol=1e-6)
    store.write_gradient_shard(0, np.arange(4), np.zeros((4, 4), np.float32))  # a later version: not read
    np.testing.assert_array_equal(store.read_gradients_by_id(np.array([1]), version)[0], vectors[[1]])
    with pytest.raises(IndexStoreError, match=r"no rows for example_ids \[12\]"):
        store.read_gradients_by_id(np.array([3, 12]), version)
