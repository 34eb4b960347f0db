"""Score modes as one inner product over the stored gradients, with a transform per side.

| mode      | query side                 | train side                           |
| dot       | g_q                        | g_i                                  |
| influence | (F+λI)^-1 g_q              | g_i                                  |
| relatif   | (F+λI)^-1 g_q              | g_i / sqrt(g_i^T (F+λI)^-1 g_i)      |
| cosine    | unit((F+λI)^-1/2 g_q)      | unit((F+λI)^-1/2 g_i)                |

relatif's denominator is ||(F+λI)^-1/2 g_i||, so relatif and cosine share one whitening.
"""

from __future__ import annotations

import torch

from dataworth.attribution.curvature import Curvature
from dataworth.config import ScoreMode
from dataworth.errors import ConfigError

# Rows with (numerically) zero gradient score 0 instead of dividing by zero.
_EPS = 1e-30


def _unit(x: torch.Tensor) -> torch.Tensor:
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > _EPS, x / norm.clamp(min=_EPS), torch.zeros_like(x))


def prepare_queries(queries: torch.Tensor, curvature: Curvature, modes: list[ScoreMode]) -> dict[str, torch.Tensor]:
    """Query-side vectors per mode (computed once per query batch)."""
    out: dict[str, torch.Tensor] = {}
    if "dot" in modes:
        out["dot"] = queries
    if "influence" in modes or "relatif" in modes:
        inv = curvature.apply(queries, -1.0)
        for m in ("influence", "relatif"):
            if m in modes:
                out[m] = inv
    if "cosine" in modes:
        out["cosine"] = _unit(curvature.apply(queries, -0.5))
    return out


def score_batch(
    prepared: dict[str, torch.Tensor], train: torch.Tensor, curvature: Curvature
) -> dict[str, torch.Tensor]:
    """(n_queries, n_train) scores per mode for one batch of stored gradients."""
    scores: dict[str, torch.Tensor] = {}
    whitened = None
    if "relatif" in prepared or "cosine" in prepared:
        whitened = curvature.apply(train, -0.5)
    for mode, q in prepared.items():
        if mode in ("dot", "influence"):
            scores[mode] = q @ train.T
        elif mode == "relatif":
            norm = whitened.norm(dim=1)
            raw = q @ train.T
            scores[mode] = torch.where(norm > _EPS, raw / norm.clamp(min=_EPS), torch.zeros_like(raw))
        elif mode == "cosine":
            scores[mode] = q @ _unit(whitened).T
        else:
            raise ConfigError(f"unknown score mode {mode!r}; choose dot, influence, relatif or cosine")
    return scores


class TopK:
    """Streaming top-k per query; ties broken by the smaller example id so results
    do not depend on batch size or read order."""

    def __init__(self, n_queries: int, k: int):
        self.k = k
        self.scores = torch.empty(n_queries, 0, dtype=torch.float64)
        self.ids = torch.empty(n_queries, 0, dtype=torch.long)

    def update(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        scores = torch.cat([self.scores, scores.to(torch.float64).cpu()], dim=1)
        ids = torch.cat([self.ids, ids.to(torch.long).cpu().expand(scores.shape[0], -1)], dim=1)
        order = torch.argsort(ids, dim=1, stable=True)
        scores, ids = scores.gather(1, order), ids.gather(1, order)
        order = torch.argsort(-scores, dim=1, stable=True)[:, : self.k]
        self.scores, self.ids = scores.gather(1, order), ids.gather(1, order)


class Scorer:
    """Scores query gradients against batches of stored gradients, for several modes at once."""

    def __init__(
        self,
        queries: torch.Tensor,
        curvature: Curvature,
        modes: list[ScoreMode],
        top_k: int,
        full_matrix_size: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.dtype = dtype
        self.curvature = curvature
        self.prepared = prepare_queries(queries.to(dtype), curvature, modes)
        n = queries.shape[0]
        self.topk = {m: TopK(n, top_k) for m in modes}
        self.full = (
            {m: torch.zeros(n, full_matrix_size, dtype=torch.float64) for m in modes} if full_matrix_size else None
        )
        self.pairs = 0

    def update(self, ids: torch.Tensor, train: torch.Tensor) -> None:
        """`ids` are example ids; with a full matrix they index its columns (ids in [0, N))."""
        scores = score_batch(self.prepared, train.to(self.dtype), self.curvature)
        for mode, s in scores.items():
            self.topk[mode].update(s, ids)
            if self.full is not None:
                self.full[mode][:, ids.long()] = s.to(torch.float64).cpu()
        self.pairs += train.shape[0] * next(iter(self.prepared.values())).shape[0]
