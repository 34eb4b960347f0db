"""Every score mode from one stacked matmul against the raw stored gradients.

| mode      | query side                 | train side                           |
| dot       | g_q                        | g_i                                  |
| influence | (F+λI)^-1 g_q              | g_i                                  |
| relatif   | (F+λI)^-1 g_q              | g_i / n_i                            |
| cosine    | (F+λI)^-1 g_q / n_q        | g_i / n_i                            |
| trackstar | (T+λI)^-1 g_q / t_q        | g_i / t_i                            |

with n = ‖(F+λI)^-1/2 g‖ = sqrt(g^T (F+λI)^-1 g). `trackstar` is TrackStar's score (Chang et al. 2024): unit norm
on both sides after a task-specific curvature T = `Curvature.mixed` (the train Fisher mixed with the Fisher of the
run's query gradients, weight score.task_mix) and t = ‖(T+λI)^-1/2 g‖; with an index logged under
logging.optimizer_state its gradients are also corrected by the optimizer's second moment, as TrackStar's are. T
depends on the query set, so its t_i are computed per batch (one [B, b] @ [b, b] product per block), not stored.

The modes differ only by a transform of the query and one scalar per stored example, so a stored batch is scored
by one matmul of at most three vectors per query (g_q, (F+λI)^-1 g_q and, for trackstar, (T+λI)^-1 g_q) followed
by a per-column scale 1/n_i (and, for cosine, a per-row 1/n_q). The n_i are computed once per (curvature,
damping) and kept with the index; given none, the Scorer computes them per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dataworth.attribution.curvature import Curvature, TaskCurvature
from dataworth.config import ALL_MODES, ALL_SCORE_MODES, ScoreMode
from dataworth.errors import ConfigError

# Rows with (numerically) zero gradient score 0 instead of dividing by zero.
_EPS = 1e-30
NORM_MODES = ("relatif", "cosine")
_INVERSE_MODES = ("influence", "relatif", "cosine")
# The share of the query set's Fisher in trackstar's curvature when none is given (score.task_mix's default).
DEFAULT_TASK_MIX = 0.5


def needs_norms(modes) -> bool:
    """Whether these modes divide by the stored examples' norms ‖(F+λI)^-1/2 g_i‖."""
    return any(m in NORM_MODES for m in modes)


def _reciprocal(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > _EPS, x.clamp(min=_EPS).reciprocal(), torch.zeros_like(x))


@dataclass(frozen=True)
class PreparedQueries:
    """The query side of every mode, stacked so that one stored batch costs one matmul."""

    modes: tuple[ScoreMode, ...]
    stacked: torch.Tensor  # [r·Q, dim]: g_q rows (dot), then (F+λI)^-1 g_q rows (the other modes); r ≤ 2
    plain: slice | None  # rows of g_q in `stacked`
    inverse: slice | None  # rows of (F+λI)^-1 g_q in `stacked`
    query_scale: torch.Tensor | None  # [Q] 1/‖(F+λI)^-1/2 g_q‖ (0 for a zero query); cosine only
    n_queries: int
    task: slice | None = None  # rows of (T+λI)^-1 g_q in `stacked` (trackstar)
    task_scale: torch.Tensor | None = None  # [Q] 1/‖(T+λI)^-1/2 g_q‖ (trackstar)
    task_curvature: Curvature | TaskCurvature | None = None  # T, whose norms of the stored rows trackstar divides by

    @property
    def needs_norms(self) -> bool:
        return needs_norms(self.modes)

    def take(self, rows: list[int]) -> PreparedQueries:
        """The prepared queries of these rows only (in this order)."""
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.stacked.device)
        n, parts, plain, inverse, task = len(rows), [], None, None, None
        if self.plain is not None:
            parts.append(self.stacked[self.plain][rows_t])
            plain = slice(0, n)
        if self.inverse is not None:
            parts.append(self.stacked[self.inverse][rows_t])
            inverse = slice(len(parts) * n - n, len(parts) * n)
        if self.task is not None:
            parts.append(self.stacked[self.task][rows_t])
            task = slice(len(parts) * n - n, len(parts) * n)
        scale = None if self.query_scale is None else self.query_scale[rows_t]
        task_scale = None if self.task_scale is None else self.task_scale[rows_t]
        return PreparedQueries(
            self.modes, torch.cat(parts), plain, inverse, scale, n, task, task_scale, self.task_curvature
        )


def prepare_queries(
    queries: torch.Tensor,
    curvature: Curvature,
    modes: list[ScoreMode],
    dtype: torch.dtype | None = None,
    task_mix: float = DEFAULT_TASK_MIX,
    task: Curvature | None = None,
) -> PreparedQueries:
    """Query-side vectors of every mode (once per query set): transforms in float64, stored in `dtype`.

    trackstar's curvature is `task`, else `curvature.mixed(queries, task_mix)`: give `task` when these queries are
    a part of the run's query set (T is the whole set's)."""
    unknown = [m for m in modes if m not in ALL_SCORE_MODES] or ([] if modes else [None])
    if unknown:
        if unknown[0] in ALL_MODES:  # bm25 and the hybrid modes search an index's text: the query flow has them
            raise ConfigError(
                f"score mode {unknown[0]!r} needs an index's full-text index (dataworth query); the Scorer computes "
                f"the gradient modes {', '.join(ALL_SCORE_MODES)}"
            )
        raise ConfigError(f"unknown score mode {unknown[0]!r}; choose {', '.join(ALL_SCORE_MODES)}")
    dtype = dtype or queries.dtype
    q64 = queries.to(torch.float64)
    n = queries.shape[0]
    parts, plain, inverse, query_scale = [], None, None, None
    if "dot" in modes:
        parts.append(q64)
        plain = slice(0, n)
    if any(m in _INVERSE_MODES for m in modes):
        parts.append(curvature.apply(q64, -1.0))
        inverse = slice(len(parts) * n - n, len(parts) * n)
    if "cosine" in modes:
        query_scale = _reciprocal(curvature.whitened_norms(q64)).to(dtype)
    task_rows = task_scale = None
    if "trackstar" in modes:
        task = task if task is not None else curvature.mixed(q64, task_mix)
        parts.append(task.apply(q64, -1.0))
        task_rows = slice(len(parts) * n - n, len(parts) * n)
        task_scale = _reciprocal(task.whitened_norms(q64)).to(dtype)
    else:
        task = None
    stacked = torch.cat(parts).to(dtype).contiguous()
    return PreparedQueries(
        tuple(dict.fromkeys(modes)), stacked, plain, inverse, query_scale, n, task_rows, task_scale, task
    )


def score_batch(
    prepared: PreparedQueries,
    train: torch.Tensor,
    norms: torch.Tensor | None = None,
    task_norms: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """(n_queries, n_train) scores per mode for one batch of stored gradients [n_train, dim].

    `norms` [n_train] are the rows' ‖(F+λI)^-1/2 g_i‖, needed by relatif and cosine; `task_norms` their
    ‖(T+λI)^-1/2 g_i‖ under trackstar's curvature, computed here when not given.
    """
    if prepared.needs_norms and norms is None:
        raise ValueError("relatif and cosine need the stored rows' norms ‖(F+λI)^-1/2 g_i‖; pass norms")
    raw = prepared.stacked @ train.T  # [r·Q, dim] @ [dim, B] → [r·Q, B]
    scores: dict[str, torch.Tensor] = {}
    relatif = None
    if prepared.needs_norms:
        relatif = raw[prepared.inverse] * _reciprocal(norms.to(raw))[None, :]  # per-column scale 1/n_i
    for mode in prepared.modes:
        if mode == "dot":
            scores[mode] = raw[prepared.plain]
        elif mode == "influence":
            scores[mode] = raw[prepared.inverse]
        elif mode == "relatif":
            scores[mode] = relatif
        elif mode == "cosine":
            scores[mode] = relatif * prepared.query_scale[:, None]  # per-row scale 1/n_q
        else:  # trackstar: the same two scales, under the task curvature
            if task_norms is None:
                task_norms = prepared.task_curvature.whitened_norms(train.to(raw.dtype))
            scale = _reciprocal(task_norms.to(raw))[None, :] * prepared.task_scale[:, None]
            scores[mode] = raw[prepared.task] * scale
    return scores


def _batch_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (score, id) per row of one batch, ties at the k-th score resolved by the smaller id."""
    n, b = scores.shape
    if b <= k:
        return scores, ids.expand(n, b)
    vals, cols = scores.topk(k + 1, dim=1)  # one extra: a tie across the cut shows as vals[k-1] == vals[k]
    tied = (vals[:, k - 1] == vals[:, k]).nonzero().squeeze(1)
    vals, top_ids = vals[:, :k], ids[cols[:, :k]]
    if tied.numel():  # rare (duplicate or zero gradients): order those rows exactly by (score desc, id asc)
        by_id = torch.argsort(ids)
        sub = scores[tied][:, by_id]
        pick = torch.sort(sub, dim=1, descending=True, stable=True).indices[:, :k]
        vals[tied], top_ids[tied] = sub.gather(1, pick), ids[by_id][pick]
    return vals, top_ids


def merge_ranked(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of candidate lists [n_queries, M]: higher score first, equal scores by the smaller id.

    Exact for any candidates that contain the true top-k, so merging per-batch (or per-shard-range)
    top-k lists gives the top-k of their union."""
    order = torch.argsort(ids, dim=1, stable=True)
    scores, ids = scores.gather(1, order), ids.gather(1, order)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), ids.gather(1, order)


class TopK:
    """Streaming top-k per query; ties broken by the smaller example id so results
    do not depend on batch size or read order.

    Each batch costs one `torch.topk` over its scores and a merge of 2k candidates per query.
    """

    def __init__(self, n_queries: int, k: int):
        self.k = k
        self._scores = torch.empty(n_queries, 0, dtype=torch.float64)
        self._ids = torch.empty(n_queries, 0, dtype=torch.long)

    @property
    def scores(self) -> torch.Tensor:
        """[n_queries, ≤k] best scores, best first (float64, on the CPU)."""
        return self._scores.to(torch.float64).cpu()

    @property
    def ids(self) -> torch.Tensor:
        """[n_queries, ≤k] example ids of `scores`."""
        return self._ids.cpu()

    def update(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        """Merge one batch: `scores` [n_queries, B] of the examples `ids` [B]."""
        ids = ids.to(device=scores.device, dtype=torch.long)
        vals, top_ids = _batch_topk(scores, ids, self.k)
        if self._scores.shape[1]:
            vals = torch.cat([self._scores.to(vals), vals], dim=1)  # [Q, ≤2k]
            top_ids = torch.cat([self._ids.to(top_ids.device), top_ids], dim=1)
        self._scores, self._ids = merge_ranked(vals, top_ids, self.k)


class Scorer:
    """Scores query gradients against batches of stored gradients, for several modes at once.

    `norms` (optional) are ‖(F+λI)^-1/2 g_i‖ indexed by example id, for this curvature and damping
    (the index keeps them); without them relatif and cosine compute them per batch. trackstar's curvature is
    fitted on these queries (`task_mix`, see `Curvature.mixed`), so a Scorer must see the whole query set.
    Scores are computed in `dtype` on `device` (default: the queries' device).
    """

    def __init__(
        self,
        queries: torch.Tensor,
        curvature: Curvature,
        modes: list[ScoreMode],
        top_k: int,
        full_matrix_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        norms: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        task_mix: float = DEFAULT_TASK_MIX,
    ):
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else queries.device
        self.curvature = curvature
        self.prepared = prepare_queries(queries.to(self.device), curvature, modes, dtype, task_mix)
        self.norms = norms.to(self.device, dtype) if norms is not None and self.prepared.needs_norms else None
        n = queries.shape[0]
        self.topk = {m: TopK(n, top_k) for m in self.prepared.modes}
        self.full = (
            {m: torch.zeros(n, full_matrix_size, dtype=torch.float64) for m in self.prepared.modes}
            if full_matrix_size
            else None
        )
        self.pairs = 0

    @property
    def needs_norms(self) -> bool:
        return self.prepared.needs_norms

    def scores(
        self, ids: torch.Tensor, train: torch.Tensor, norms: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Every mode's (n_queries, B) scores of one batch, without keeping them (`update` keeps them).

        `norms` [B] (optional) are the rows' ‖(F+λI)^-1/2 g_i‖, else taken from the Scorer's or computed.
        """
        dev_ids = torch.as_tensor(ids, dtype=torch.long).to(self.device)
        train = train.to(self.device, self.dtype)
        if self.prepared.needs_norms:
            if norms is not None:
                norms = norms.to(self.device, self.dtype)
            elif self.norms is not None:
                norms = self.norms[dev_ids]
            else:
                norms = self.curvature.whitened_norms(train)
        return score_batch(self.prepared, train, norms)

    def keep(self, ids: torch.Tensor, scores: dict[str, torch.Tensor]) -> None:
        """Merge one batch's scores (mode → [n_queries, B]) into the top-k and the full matrix."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        dev_ids = ids.to(self.device)
        for mode, s in scores.items():
            self.topk[mode].update(s, dev_ids)
            if self.full is not None:
                self.full[mode][:, ids] = s.to(torch.float64).cpu()
        self.pairs += int(ids.numel()) * self.prepared.n_queries

    def update(self, ids: torch.Tensor, train: torch.Tensor, norms: torch.Tensor | None = None) -> None:
        """`ids` are example ids; with a full matrix they index its columns (ids in [0, N)).

        `norms` [B] (optional) are the rows' ‖(F+λI)^-1/2 g_i‖, else taken from the Scorer's or computed.
        """
        self.keep(ids, self.scores(ids, train, norms))


def checkpoint_sum(
    scorers: Sequence[Scorer], weights: Sequence[float], ids: torch.Tensor, trains: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Σ_c w_c · score_c of one batch over checkpoints, mode by mode (TracIn over checkpoints, Pruthi et al.
    2020): `scorers[c]` holds checkpoint c's query side (its model's query gradients, its curvature) and
    `trains[c]` the same examples' (`ids`) stored gradients in checkpoint c's index. Each checkpoint keeps its
    own projections and curvature, so every mode is the weighted sum of that mode's per-checkpoint scores."""
    if not scorers or len(scorers) != len(weights) or len(scorers) != len(trains):
        raise ValueError("give one scorer, one weight and one batch of stored gradients per checkpoint")
    total: dict[str, torch.Tensor] = {}
    for scorer, weight, train in zip(scorers, weights, trains):
        for mode, s in scorer.scores(ids, train).items():
            total[mode] = weight * s if mode not in total else total[mode] + weight * s.to(total[mode])
    return total
