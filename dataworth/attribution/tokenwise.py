"""Token-wise attribution (RapidIn's token-wise view): one score taken apart over tokens, on either side.

Every gradient mode is score(q, i) = u_q · g_i · c_i, u_q the mode's prepared query vector and c_i its per-example
scale (scoring.py). Both factors are sums over tokens, and the mode is linear in each:

- train side: the stored g_i = Σ_t (P_out dy_t)(P_in x_t)ᵀ over the example's positions t (hooks.py), so with
  g_i^(t) the one-position term, s_t = u_q · g_i^(t) · c_i sums over t to the score. c_i stays the scalar of the
  whole example (its stored norm), never one per position. KFAC-whitened and optimizer-corrected projections are
  P_in and P_out themselves, so they need nothing more.
- query side: g_q = Σ_j ∇ℓ_j over the completion tokens j (÷ n under loss_reduction 'mean'), and u_q is a linear
  map of g_q times constants of the whole query (cosine's 1/‖(F+λ)^-½ g_q‖, trackstar's under T, with T fitted on
  the run's whole query set), so s_j = u_q^(j) · g_i · c_i with u_q^(j) that map of ∇ℓ_j, the same constants
  kept, sums over j to the score.

A token's g^(t) is its position's term: the activation x_t and output gradient dy_t at position t of the layer
input, which the forward pass sees at token t. RapidGrad is refused: its layer-wise normalization divides by the
norm of the whole layer gradient, which per-token query gradients (each its own backward pass) do not have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from dataworth.attribution.curvature import Curvature
from dataworth.attribution.hooks import GradientCollector
from dataworth.attribution.projection import FittedProjections
from dataworth.attribution.scoring import DEFAULT_TASK_MIX, PreparedQueries, _reciprocal, prepare_queries
from dataworth.config import ALL_SCORE_MODES, LoggingConfig, ScoreMode
from dataworth.data import collate
from dataworth.errors import ConfigError, ModelError
from dataworth.queries import EncodedQuery


def check_tokenwise(logging: LoggingConfig, modes: Sequence[str], checkpoints: int = 0) -> list[str]:
    """The gradient modes of `modes` that token-wise attribution splits (bm25 and the hybrid modes are skipped);
    raises for what it cannot split: RapidGrad indexes, TracIn sums over checkpoints, no gradient mode at all."""
    if logging.projection == "rapidgrad":
        raise ConfigError(
            "token-wise attribution (tokenwise_top) needs a Kronecker-projected index: RapidGrad normalizes each "
            "layer's whole gradient, which per-token query gradients do not have; query without --tokenwise-top, "
            "or build the index with another --projection"
        )
    if checkpoints:
        raise ConfigError(
            "token-wise attribution (tokenwise_top) splits one index's scores; a TracIn sum over checkpoint indexes "
            "is not split: leave out --checkpoint-indexes or --tokenwise-top"
        )
    split = [m for m in modes if m in ALL_SCORE_MODES]
    if not split:
        raise ConfigError(
            f"token-wise attribution (tokenwise_top) splits gradient modes ({', '.join(ALL_SCORE_MODES)}), and the "
            f"modes asked for are {', '.join(modes)}: add one, or leave out --tokenwise-top"
        )
    return split


class PositionCollector(GradientCollector):
    """A GradientCollector that keeps the position axis: (B, T, dim) per-position projected gradients whose sum
    over T is `batch_gradients`' (B, dim). Padded positions are zero."""

    def __init__(self, model, cfg: LoggingConfig, fitted: FittedProjections | None = None):
        if cfg.projection == "rapidgrad":
            check_tokenwise(cfg, ALL_SCORE_MODES)
        super().__init__(model, cfg, fitted)
        # Every module keeps its (projected or full) pairs until the end of the pass: no per-module early products,
        # whose sum over positions would lose the position axis.
        self._unprojected = set()

    def position_gradients(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """(B, T, dim) per-position projected gradients of the batch's summed per-example losses."""
        self._reset()
        try:
            self._backward(input_ids, attention_mask, labels)
            batch, width = input_ids.shape
            parts = []
            for block in self.layout.blocks:
                g = torch.zeros(batch, width, block.k_out * block.k_in, dtype=self.dtype, device=self.device)
                for dy, x in self._pairs.get(block.name, []):  # a shared module: its calls add up per position
                    if dy.shape[1] != width:
                        raise ModelError(
                            f"module {block.name!r} sees {dy.shape[1]} positions for {width} tokens; token-wise "
                            "attribution needs one activation per token: exclude it (logging.exclude_modules)"
                        )
                    # [B, T, k_out] x [B, T, k_in] → [B, T, k_out·k_in] (row-major G_t, as stored)
                    g += torch.einsum("bto,bti->btoi", dy.to(self.dtype), x.to(self.dtype)).reshape(batch, width, -1)
                parts.append(g)
        finally:
            self._reset()
        return torch.cat(parts, dim=2)


def iter_position_gradients(
    model,
    sequences: Sequence[Sequence[int]],
    cfg: LoggingConfig,
    pad_id: int,
    batch_size: int,
    fitted: FittedProjections | None = None,
    label_masks: Sequence[list[bool] | None] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, per-position projected gradients [len, dim] on the CPU) of each training sequence (loss on every
    token, as logged, or where `label_masks[i]` is True: Example.label_mask), batch by batch (shortest first:
    little padding), so that a caller keeps one batch at a time; each sums over its positions to the sequence's
    logged gradient."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    with PositionCollector(model, cfg, fitted) as collector:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            masks = None if label_masks is None else [label_masks[i] for i in rows]
            input_ids, attention, labels = collate([list(sequences[i]) for i in rows], pad_id, masks)
            g = collector.position_gradients(input_ids, attention, labels).detach().cpu()  # [B, T, dim]
            for b, i in enumerate(rows):
                yield i, g[b, : len(sequences[i])]


def example_position_gradients(
    model,
    sequences: Sequence[Sequence[int]],
    cfg: LoggingConfig,
    pad_id: int,
    batch_size: int,
    fitted: FittedProjections | None = None,
) -> list[torch.Tensor]:
    """iter_position_gradients' tensors, in the order given."""
    out: list[torch.Tensor | None] = [None] * len(sequences)
    for i, g in iter_position_gradients(model, sequences, cfg, pad_id, batch_size, fitted):
        out[i] = g
    return out


def completion_token_gradients(
    model,
    queries: Sequence[EncodedQuery],
    cfg: LoggingConfig,
    pad_id: int,
    batch_size: int,
    fitted: FittedProjections | None = None,
) -> list[torch.Tensor]:
    """Per-completion-token gradients [n, dim] of each query: row j is the gradient of completion token j's loss
    (÷ n under loss_reduction 'mean'), so the rows sum to the query gradient. One backward pass per token: the
    query is repeated with the loss on one token each, batch_size sequences per pass."""
    copies = []  # (query index, token index, sequence, label mask)
    for qi, q in enumerate(queries):
        n_prompt = len(q.prompt_ids)
        for j in range(len(q.completion_ids)):
            mask = [False] * len(q.input_ids)
            mask[n_prompt + j] = True
            copies.append((qi, j, q.input_ids, mask))
    out = [None] * len(queries)
    with GradientCollector(model, cfg, fitted) as collector:
        for start in range(0, len(copies), batch_size):
            batch = copies[start : start + batch_size]
            input_ids, attention, labels = collate([c[2] for c in batch], pad_id, [c[3] for c in batch])
            grads, _ = collector.batch_gradients(input_ids, attention, labels)
            grads = grads.detach().cpu()
            for row, (qi, j, _, _) in enumerate(batch):
                if out[qi] is None:
                    out[qi] = torch.zeros(len(queries[qi].completion_ids), grads.shape[1], dtype=grads.dtype)
                out[qi][j] = grads[row]
    if cfg.loss_reduction == "mean":
        out = [g / g.shape[0] for g in out]
    return out


def query_side(
    prepared: PreparedQueries, curvature: Curvature, modes: Sequence[ScoreMode], vectors: torch.Tensor, rows
) -> dict[str, torch.Tensor]:
    """Each mode's query-side map of `vectors` [n, dim], row r with the constants of prepared query `rows[r]`: u_q
    for a g_q, the per-token parts u_q^(j) for its token gradients (linear, so they sum to u_q). One application of
    (F+λ)^-1 serves influence, relatif and cosine, one of (T+λ)^-1 trackstar."""
    v = vectors.to(torch.float64)
    rows = torch.as_tensor(rows, dtype=torch.long)
    inverse = curvature.apply(v, -1.0) if any(m in ("influence", "relatif", "cosine") for m in modes) else None
    out = {}
    for mode in modes:
        if mode == "dot":
            out[mode] = v
        elif mode in ("influence", "relatif"):
            out[mode] = inverse
        elif mode == "cosine":
            out[mode] = inverse * prepared.query_scale.to(v)[rows][:, None]
        elif mode == "trackstar":
            out[mode] = prepared.task_curvature.apply(v, -1.0) * prepared.task_scale.to(v)[rows][:, None]
        else:
            raise ConfigError(f"token-wise attribution splits {', '.join(ALL_SCORE_MODES)}, not {mode!r}")
    return out


def train_scale(
    prepared: PreparedQueries, curvature: Curvature, mode: ScoreMode, g: torch.Tensor, norm: float | None
) -> float:
    """c_i of the mode for the whole example's gradient g [dim]: 1, 1/‖(F+λ)^-½ g‖ (`norm`, the stored one when
    given), or 1/‖(T+λ)^-½ g‖ under trackstar's task curvature — as the Scorer divides."""
    if mode in ("dot", "influence"):
        return 1.0
    g = g.to(torch.float64)[None, :]
    if mode == "trackstar":
        n = prepared.task_curvature.whitened_norms(g)[0]
    else:
        n = curvature.whitened_norms(g)[0] if norm is None else torch.tensor(float(norm), dtype=torch.float64)
    return float(_reciprocal(n))


@dataclass(frozen=True)
class TokenSplit:
    """One score taken apart: `query_scores` [completion tokens] and `train_scores` [example tokens]."""

    query: int  # index of the query in the queries given
    mode: str
    example_id: int
    score: float  # u_q · g_i · c_i with the example's given (stored) gradient
    query_tokens: list[int]  # the completion's token ids
    query_scores: torch.Tensor
    train_tokens: list[int]  # the example's token ids
    train_scores: torch.Tensor


def token_splits(
    model,
    cfg: LoggingConfig,
    fitted: FittedProjections | None,
    queries: Sequence[EncodedQuery],
    query_grads: torch.Tensor,
    curvature: Curvature,
    pairs: Sequence[tuple[int, str, int]],
    examples: dict[int, Sequence[int]],
    pad_id: int,
    batch_size: int = 8,
    stored: dict[int, torch.Tensor] | None = None,
    norms: dict[int, float] | None = None,
    task_mix: float = DEFAULT_TASK_MIX,
    label_masks: dict[int, list[bool] | None] | None = None,
) -> list[TokenSplit]:
    """Both token splits of each (query index, mode, example id) pair.

    `query_grads` [Q, dim] are the gradients of all `queries` (the run's whole set: trackstar's T is fitted on it);
    `examples` maps each example id to its token ids; `stored` its logged gradient (default: the recomputed sum
    over positions) and `norms` its stored ‖(F+λ)^-½ g_i‖ (default: computed from that gradient), as the Scorer
    used them; `label_masks` where its tokens' labels count (Example.label_mask; default everywhere). Token
    gradients are taken once per query and per example, however many pairs share them.
    """
    modes = list(dict.fromkeys(m for _, m, _ in pairs))
    for m in modes:
        if m not in ALL_SCORE_MODES:
            raise ConfigError(f"token-wise attribution splits {', '.join(ALL_SCORE_MODES)}, not {m!r}")
    if not pairs:
        return []
    prepared = prepare_queries(query_grads.to(torch.float64), curvature, modes, torch.float64, task_mix)
    q_rows = sorted({q for q, _, _ in pairs})
    per_token = completion_token_gradients(model, [queries[q] for q in q_rows], cfg, pad_id, batch_size, fitted)
    q_tokens = dict(zip(q_rows, per_token))
    # Every query's g_q row, then its token rows, mapped once per mode.
    stacked = torch.cat([query_grads[q_rows].to(torch.float64), *(q_tokens[q].to(torch.float64) for q in q_rows)])
    owner = q_rows + [q for q in q_rows for _ in range(q_tokens[q].shape[0])]
    mapped = query_side(prepared, curvature, modes, stacked, owner)
    first, at = {}, len(q_rows)
    for q in q_rows:
        first[q], at = at, at + q_tokens[q].shape[0]
    # Example by example (one batch of per-position vectors in memory at a time), every pair it is in.
    ex_ids = sorted({e for _, _, e in pairs})
    of_example: dict[int, list[int]] = {}
    for k, (_, _, e) in enumerate(pairs):
        of_example.setdefault(e, []).append(k)
    out: list[TokenSplit | None] = [None] * len(pairs)
    sequences = [examples[e] for e in ex_ids]
    masks = None if label_masks is None else [label_masks.get(e) for e in ex_ids]
    for i, per_pos in iter_position_gradients(model, sequences, cfg, pad_id, batch_size, fitted, masks):
        e = ex_ids[i]
        per_pos = per_pos.to(torch.float64)  # [len, dim]
        g = per_pos.sum(0) if stored is None else stored[e].to(torch.float64)
        scales: dict[str, float] = {}  # c_i per mode, shared by the example's pairs with every query
        for k in of_example[e]:
            q, mode, _ = pairs[k]
            if mode not in scales:
                scales[mode] = train_scale(prepared, curvature, mode, g, None if norms is None else norms.get(e))
            c = scales[mode]
            u_q = mapped[mode][q_rows.index(q)]  # [dim]
            u_tokens = mapped[mode][first[q] : first[q] + q_tokens[q].shape[0]]  # [n, dim]
            out[k] = TokenSplit(
                query=q,
                mode=mode,
                example_id=e,
                score=float(u_q @ g) * c,
                query_tokens=list(queries[q].completion_ids),
                query_scores=(u_tokens @ g) * c,  # [n, dim] @ [dim] → [n]
                train_tokens=list(examples[e]),
                train_scores=(per_pos @ u_q) * c,  # [len, dim] @ [dim] → [len]
            )
    return out
