"""Full score matrices (queries × training examples), one per method, as .npz files.

They travel between evaluation stages as files: a task writes one, later tasks read them by path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dataworth.evaluation.lds import spearman


def load_matrices(path: str | Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """(method -> [queries, examples] scores, query ids of the rows) of one .npz file."""
    data = np.load(path, allow_pickle=False)
    query_ids = [str(q) for q in data["query_ids"]]
    return {k: data[k] for k in data.files if k != "query_ids"}, query_ids


def save_matrices(path: str | Path, matrices: dict[str, np.ndarray], query_ids: list[str]) -> str:
    """Write the matrices whole (to a temporary file first, then renamed); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **matrices, query_ids=np.array(query_ids))
    tmp.replace(path)
    return str(path)


def merge_matrices(paths: list[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every method's matrix from several files, which must hold the same queries in the same order."""
    merged: dict[str, np.ndarray] = {}
    ids = None
    for p in paths:
        m, q = load_matrices(p)
        if ids is not None and q != ids:
            raise ValueError(f"score matrices {paths} hold different queries; score them with the same queries")
        ids = q
        merged.update(m)
    return merged, ids


def attribution_values(scores: np.ndarray) -> np.ndarray:
    """Scores as attributions to sum or correlate: an example a method did not score (NaN, as outside the
    candidates of a hybrid-rerank mode) counts 0. Rankings keep the NaN, which sorts last."""
    return np.nan_to_num(scores, nan=0.0, posinf=np.inf, neginf=-np.inf)


def rank_correlations(methods: dict[str, np.ndarray], reference: str) -> dict[str, float]:
    """Mean per-query Spearman correlation of each method's scores with the reference method's."""
    ref = methods[reference]
    methods = {n: attribution_values(s) for n, s in methods.items()}
    return {
        n: float(np.nanmean([spearman(s[i], ref[i]) for i in range(ref.shape[0])]))
        for n, s in methods.items()
        if n != reference
    }


def rank_agreement(a: np.ndarray, b: np.ndarray, k: int) -> tuple[float, float]:
    """(mean per-query Spearman, mean top-k overlap) of the rows of two score matrices [queries, examples]: how far
    the rankings of an approximation `a` keep those of a reference `b`. Ties in a top-k go to the lower column."""
    rho, overlap = [], []
    for x, y in zip(np.asarray(a), np.asarray(b)):
        rho.append(spearman(x, y))
        top_x = set(np.argsort(-x, kind="stable")[:k].tolist())
        top_y = set(np.argsort(-y, kind="stable")[:k].tolist())
        overlap.append(len(top_x & top_y) / min(k, len(x)))
    return float(np.nanmean(rho)), float(np.mean(overlap))
