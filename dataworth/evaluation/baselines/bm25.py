"""BM25 (Okapi): the lexical baseline every attribution method should beat.

A document d scores, for a query q1..qm (each query token counts, repeats included),

    Σ_j idf(q_j) · f(q_j, d) (k1 + 1) / (f(q_j, d) + k1 (1 - b + b |d| / avgdl))

with the Lucene idf log(1 + (N - df + 0.5) / (df + 0.5)). Unlike the classic Robertson
idf (rank_bm25's BM25Okapi), it is positive for every df, so a term in more than half of
the documents still counts a little instead of needing an epsilon floor.

The index is a posting list per term with each posting's tf/length weight precomputed,
so a query touches only the postings of its own terms.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from dataworth.errors import ConfigError, DataError

# Unicode letters and digits; the underscore is a separator, like every other symbol.
_WORD = re.compile(r"[^\W_]+")


def tokenize_words(text: str) -> list[str]:
    """Lowercased runs of letters and digits: "Paris's 2nd-largest_city" →
    ["paris", "s", "2nd", "largest", "city"]. Punctuation, whitespace and underscores
    split words; nothing is stemmed or dropped as a stop word."""
    if not isinstance(text, str):
        raise TypeError(f"tokenize_words takes a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


def _check_tokens(tokens, what: str) -> None:
    # A bare string is iterable too and would silently become a list of characters.
    if isinstance(tokens, str):
        raise TypeError(f"{what} is a str ({tokens[:40]!r}); pass a list of tokens, e.g. tokenize_words(text)")


class BM25:
    """Okapi BM25 over pre-tokenized documents (lists of strings)."""

    def __init__(self, documents: list[list[str]], k1: float = 1.5, b: float = 0.75):
        if k1 < 0:
            raise ConfigError(f"k1={k1} must be >= 0 (1.2–2.0 is usual; 0 ignores term frequency)")
        if not 0.0 <= b <= 1.0:
            raise ConfigError(f"b={b} must lie in [0, 1] (0: no length normalization, 1: full)")
        if len(documents) == 0:
            raise DataError("documents is empty: BM25 needs at least one document to index")
        for i, doc in enumerate(documents):
            _check_tokens(doc, f"documents[{i}]")
        self.k1, self.b = float(k1), float(b)
        self.n_documents = len(documents)
        self.doc_lengths = np.array([len(d) for d in documents], dtype=np.float64)
        self.avgdl = float(self.doc_lengths.mean())

        postings: dict[str, tuple[list[int], list[int]]] = {}
        for i, doc in enumerate(documents):
            for term, tf in Counter(doc).items():
                docs, tfs = postings.setdefault(term, ([], []))
                docs.append(i)
                tfs.append(tf)
        self._docs: dict[str, np.ndarray] = {}
        self._weights: dict[str, np.ndarray] = {}
        self.idf: dict[str, float] = {}
        n = self.n_documents
        for term, (docs, tfs) in postings.items():
            d = np.array(docs, dtype=np.int64)
            tf = np.array(tfs, dtype=np.float64)
            # Only documents holding a term get a posting, so |d| > 0 and avgdl > 0 here.
            norm = 1.0 - self.b + self.b * self.doc_lengths[d] / self.avgdl
            self._docs[term] = d
            self._weights[term] = tf * (self.k1 + 1.0) / (tf + self.k1 * norm)
            df = len(docs)
            self.idf[term] = float(np.log1p((n - df + 0.5) / (df + 0.5)))

    def scores(self, query_tokens: list[str]) -> np.ndarray:
        """(n_documents,) float64 scores; a token absent from the corpus adds nothing."""
        _check_tokens(query_tokens, "query_tokens")
        out = np.zeros(self.n_documents, dtype=np.float64)
        for term in query_tokens:
            docs = self._docs.get(term)
            if docs is not None:
                # Postings hold each document once per term, so fancy-index += is safe.
                out[docs] += self.idf[term] * self._weights[term]
        return out

    def top_k(self, query_tokens: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, scores) of the k best documents, best first; equal scores go to the
        lower index, so the order never depends on the platform's sort. k larger than
        the corpus returns every document."""
        if k < 1:
            raise ConfigError(f"k={k} must be at least 1")
        s = self.scores(query_tokens)
        order = np.argsort(-s, kind="stable")[:k]
        return order, s[order]
