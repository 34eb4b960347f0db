"""Which training examples a retrained model keeps: LDS subsets and brittleness removals, keyed by content.

A subset's key is a hash of its membership mask, so every stage that retrains on the same examples
(LDS, brittleness, indexes of other logging configs over the same corpus) shares one retrained model.
"""

from __future__ import annotations

import hashlib

import numpy as np


def subset_key(mask: np.ndarray) -> str:
    """16 hex digits naming a subset by its boolean membership mask over the training examples."""
    return hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()[:16]


def keep_key(keep: list[int], n: int) -> str:
    """`subset_key` of the subset holding the examples `keep` out of n."""
    mask = np.zeros(n, dtype=bool)
    mask[keep] = True
    return subset_key(mask)


def removal_sets(scores: np.ndarray, qi: int, k: int, n: int, seed: int) -> tuple[list[int], list[int]]:
    """(examples kept after removing query qi's top-k by score, kept after removing k random examples)."""
    top = set(np.argsort(-scores[qi], kind="stable")[:k].tolist())
    rng = np.random.default_rng(seed + 7919 * qi + k)
    rand = set(rng.choice(n, size=k, replace=False).tolist())
    return [i for i in range(n) if i not in top], [i for i in range(n) if i not in rand]


def plan_removals(
    scores: dict[str, np.ndarray], methods: list[str], n_queries: int, ks: list[int], n: int, seed: int
) -> list[dict]:
    """The retrainings of a brittleness test: per method (and "random", removing k random examples instead
    of the first method's top-k), per query and per k, the kept examples {"method", "query", "k", "keep", "key"}.
    """
    plan = []
    for method in [*methods, "random"]:
        source = scores[methods[0] if method == "random" else method]
        for qi in range(min(n_queries, source.shape[0])):
            for k in ks:
                top, rand = removal_sets(source, qi, k, n, seed)
                keep = rand if method == "random" else top
                plan.append({"method": method, "query": qi, "k": k, "keep": keep, "key": keep_key(keep, n)})
    return plan


def brittleness_curves(plan: list[dict], measured: list[list[float]], full: list[float]) -> dict[str, dict[str, float]]:
    """Mean over queries of the increase of the query loss (= decrease of its log-prob) per method and k.

    measured[i]: every query's completion log-prob after retraining on plan[i]["keep"]; full: the same for
    the model trained on every example.
    """
    deltas: dict[tuple[str, int], list[float]] = {}
    for removal, log_probs in zip(plan, measured, strict=True):
        qi = removal["query"]
        deltas.setdefault((removal["method"], removal["k"]), []).append(full[qi] - log_probs[qi])
    curves: dict[str, dict[str, float]] = {}
    for (method, k), vals in deltas.items():
        curves.setdefault(method, {})[str(k)] = float(np.mean(vals))
    return curves
