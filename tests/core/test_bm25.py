"""BM25 against a hand-computed example and against rank_bm25's BM25Okapi."""

import math

import numpy as np
import pytest

from dataworth.evaluation.baselines.bm25 import BM25, tokenize_words

# lengths 3, 2, 4 → avgdl 3; df: a=1, b=2, c=2, d=1; N=3
DOCS = [["a", "b", "a"], ["b", "c"], ["c", "c", "c", "d"]]


def test_tokenize_words():
    assert tokenize_words("Paris's 2nd-largest_city, ÉTÉ!") == ["paris", "s", "2nd", "largest", "city", "été"]
    assert tokenize_words("  ...  ") == []
    with pytest.raises(TypeError):
        tokenize_words(["already", "tokens"])


def test_hand_computed_scores():
    bm = BM25(DOCS)  # k1=1.5, b=0.75
    idf_a = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))  # = log(8/3)
    idf_b = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # = log(1.6), same for c
    assert bm.idf["a"] == pytest.approx(math.log(8 / 3), abs=1e-15)
    assert bm.idf["b"] == pytest.approx(idf_b, abs=1e-15)
    # d0: tf(a)=2, |d|=avgdl → norm 1 → 2·2.5/(2+1.5) = 10/7
    assert np.allclose(bm.scores(["a"]), [idf_a * 10 / 7, 0, 0], atol=1e-14)
    # d1: tf=1, norm = 0.25 + 0.75·2/3 = 0.75 → 2.5/(1+1.125) = 20/17
    # d2: tf(c)=3, norm = 0.25 + 0.75·4/3 = 1.25 → 7.5/(3+1.875) = 20/13
    assert np.allclose(bm.scores(["b"]), [idf_b * 1.0, idf_b * 20 / 17, 0], atol=1e-14)
    assert np.allclose(bm.scores(["c"]), [0, idf_b * 20 / 17, idf_b * 20 / 13], atol=1e-14)
    # Terms add up, repeated query tokens count twice, unknown tokens add nothing.
    both = bm.scores(["a", "c", "zzz"])
    assert np.allclose(both, bm.scores(["a"]) + bm.scores(["c"]), atol=1e-14)
    assert np.allclose(bm.scores(["c", "c"]), 2 * bm.scores(["c"]), atol=1e-14)
    assert np.array_equal(bm.scores([]), np.zeros(3))


def test_parameters_change_scores_as_documented():
    # b=0: no length normalization, so tf=1 scores the same in d0 and d1.
    s = BM25(DOCS, b=0.0).scores(["b"])
    assert s[0] == pytest.approx(s[1])
    # k1=0: term frequency is ignored, each matching document gets exactly idf.
    bm = BM25(DOCS, k1=0.0)
    assert np.allclose(bm.scores(["c"]), [0, bm.idf["c"], bm.idf["c"]])


def test_top_k_order_and_ties():
    bm = BM25([["x"], ["y"], ["x"], ["x", "y"], ["x"]])
    idx, sc = bm.top_k(["x"], 3)
    assert idx.tolist() == [0, 2, 4]  # three equal scores: lower index first
    assert np.allclose(sc, bm.scores(["x"])[[0, 2, 4]])
    idx, _ = bm.top_k(["x"], 10)
    assert idx.tolist() == [0, 2, 4, 3, 1]  # k past the corpus returns everything
    with pytest.raises(ValueError, match="k=0"):
        bm.top_k(["x"], 0)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="empty"):
        BM25([])
    with pytest.raises(TypeError, match=r"documents\[1\] is a str"):
        BM25([["a"], "raw text"])
    with pytest.raises(ValueError, match="b=1.5"):
        BM25(DOCS, b=1.5)
    with pytest.raises(ValueError, match="k1=-1"):
        BM25(DOCS, k1=-1)
    with pytest.raises(TypeError, match="query_tokens is a str"):
        BM25(DOCS).scores("a b")
    # Empty documents are legal (they never match).
    assert np.array_equal(BM25([[], ["a"]]).scores(["a"]) > 0, [False, True])


def _random_corpus(seed=0, n_docs=60, vocab=40):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocab)]
    p = 1.0 / np.arange(1, vocab + 1)  # Zipf-like: a few frequent terms, a long tail
    p /= p.sum()
    return [list(rng.choice(words, size=rng.integers(1, 25), p=p)) for _ in range(n_docs)]


def test_matches_rank_bm25():
    """rank_bm25 uses the Robertson idf log((N-df+0.5)/(df+0.5)) with an epsilon floor for
    negative values, ours is Lucene's. So the comparison is in two parts: (1) with our idf
    table installed into BM25Okapi.idf, every score must agree exactly (this checks the
    tf saturation and length normalization on a corpus that includes df > N/2 terms);
    (2) with its own idf, single-term queries whose df < N/2 (both idfs positive) must rank
    documents identically, since a positive idf only rescales a single-term query."""
    rank_bm25 = pytest.importorskip("rank_bm25")
    corpus = _random_corpus()
    ours = BM25(corpus)
    n = len(corpus)
    assert any(sum(t in d for d in corpus) > n / 2 for t in ours.idf)  # the idfs really differ here

    theirs = rank_bm25.BM25Okapi(corpus, k1=1.5, b=0.75)
    robertson_idf = dict(theirs.idf)
    theirs.idf = dict(ours.idf)
    rng = np.random.default_rng(1)
    vocab = sorted(ours.idf) + ["unseen"]
    for _ in range(20):
        query = list(rng.choice(vocab, size=rng.integers(1, 6)))
        assert np.allclose(ours.scores(query), theirs.get_scores(query), rtol=1e-12, atol=1e-12)

    theirs.idf = robertson_idf
    checked = 0
    for term in sorted(ours.idf):
        df = sum(term in d for d in corpus)
        if df >= n / 2:
            continue
        a, b = ours.scores([term]), theirs.get_scores([term])
        assert np.allclose(a * robertson_idf[term], b * ours.idf[term], rtol=1e-12)
        assert np.array_equal(np.argsort(-a, kind="stable"), np.argsort(-b, kind="stable"))
        checked += 1
    assert checked > 10
