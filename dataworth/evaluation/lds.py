"""Linear datamodeling score (LDS, Park et al. 2023, TRAK): do attribution scores predict
what retraining on random subsets of the training set actually does?

Draw subsets S_1..S_m of the training set, retrain a model on each, and measure a query's
outcome f(q; S_j). An attribution method predicts the outcome as Σ_{i∈S_j} τ(q, z_i); the
LDS of a query is the Spearman correlation, across subsets, of prediction and outcome,
and the method's LDS is its mean over queries. Retraining happens elsewhere; this module
is the arithmetic.
"""

from __future__ import annotations

import numpy as np


def sample_subsets(n_examples: int, n_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """(n_subsets, n_examples) boolean masks, each with exactly round(fraction · n_examples)
    True entries (Python's round: halves go to the even integer), drawn uniformly without
    replacement. The same arguments always give the same masks, on any platform."""
    if n_examples < 2:
        raise ValueError(f"n_examples={n_examples}: subsets need at least 2 examples to differ")
    if n_subsets < 1:
        raise ValueError(f"n_subsets={n_subsets} must be at least 1 (LDS papers use 50–100+)")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction} must lie strictly between 0 and 1 (0.5 is the usual choice)")
    size = round(fraction * n_examples)
    if not 0 < size < n_examples:
        raise ValueError(
            f"fraction={fraction} of n_examples={n_examples} rounds to {size} examples per subset, so every "
            "subset would be identical; use a fraction nearer 0.5"
        )
    rng = np.random.default_rng(seed)
    # Ranking one row of uniforms picks a uniform random subset of fixed size.
    chosen = np.argsort(rng.random((n_subsets, n_examples)), axis=1, kind="stable")[:, :size]
    masks = np.zeros((n_subsets, n_examples), dtype=bool)
    np.put_along_axis(masks, chosen, True, axis=1)
    return masks


def _as_2d(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {x.shape}")
    return x


def predicted_subset_scores(scores, masks) -> np.ndarray:
    """(n_queries, n_subsets): the datamodel's prediction for each subset, the sum of the
    scores of the examples it holds. `scores` is (n_queries, n_examples)."""
    scores = _as_2d(scores, "scores")
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype != bool:
        raise ValueError(f"masks must be a 2-D boolean array, got shape {masks.shape} and dtype {masks.dtype}")
    if scores.shape[1] != masks.shape[1]:
        raise ValueError(
            f"scores has shape {scores.shape} (n_queries, n_examples) but masks has shape {masks.shape} "
            f"(n_subsets, n_examples): the example counts {scores.shape[1]} and {masks.shape[1]} must match"
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf; check the gradients/curvature that produced them")
    return scores @ masks.T.astype(np.float64)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends - 1) / 2.0 + 1.0  # tied values share the mean of their 1-based ranks
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"need two 1-D arrays of equal length, got shapes {a.shape} and {b.shape}")
    if len(a) < 2:
        raise ValueError(f"a correlation needs at least 2 pairs, got {len(a)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("inputs contain NaN or inf; drop or fix those entries first")
    return a, b


def pearson(a, b) -> float:
    """Pearson correlation of two 1-D arrays; NaN when either is constant."""
    a, b = _pair(a, b)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denom) if denom > 0 else float("nan")


def spearman(a, b) -> float:
    """Spearman rank correlation (tied values get their average rank, as in
    scipy.stats.spearmanr); NaN when either array is constant."""
    a, b = _pair(a, b)
    return pearson(_average_ranks(a), _average_ranks(b))


def linear_datamodeling_score(scores, masks, actual) -> dict:
    """LDS of attribution `scores` (n_queries, n_examples) against outcomes measured on
    models retrained on the subsets `masks` (n_subsets, n_examples).

    `actual` (n_queries, n_subsets) must be a quantity that goes UP when the predicted
    score goes up. dataworth's scores are positive when training on an example lowers
    the query's loss, so dataworth passes the negative query loss: the log-probability
    of the query's completion under the model trained on each subset.

    Returns {"lds": mean over valid queries, "per_query": (n_queries,) array,
    "n_valid": number of valid queries}. A query whose outcome is the same on every
    subset has no ranking to predict: its entry is NaN and it is left out of the mean.
    A query whose outcome varies but whose prediction is constant (e.g. all-zero
    scores) gets 0, not NaN: the method predicted nothing, and excluding such queries
    would let a method raise its LDS by abstaining.
    """
    predicted = predicted_subset_scores(scores, masks)
    actual = _as_2d(actual, "actual")
    if actual.shape != predicted.shape:
        raise ValueError(
            f"actual has shape {actual.shape} but scores {np.shape(scores)} and masks {np.shape(masks)} give "
            f"predictions of shape {predicted.shape} (n_queries, n_subsets); pass one outcome per query and subset"
        )
    if predicted.shape[1] < 3:
        raise ValueError(
            f"{predicted.shape[1]} subsets give a meaningless rank correlation; use at least 3 (50+ is usual)"
        )
    if not np.isfinite(actual).all():
        raise ValueError("actual contains NaN or inf; a retrained model's loss diverged, or a value is missing")
    per_query = np.full(predicted.shape[0], np.nan)
    for q in range(predicted.shape[0]):
        if np.ptp(actual[q]) == 0:
            continue
        rho = spearman(predicted[q], actual[q])
        per_query[q] = 0.0 if np.isnan(rho) else rho
    valid = ~np.isnan(per_query)
    if not valid.any():
        raise ValueError(
            "actual is constant across subsets for every query, so no LDS can be computed; check that each "
            "subset's model was really retrained on its subset (and that `actual` is not copied across columns)"
        )
    return {"lds": float(per_query[valid].mean()), "per_query": per_query, "n_valid": int(valid.sum())}
