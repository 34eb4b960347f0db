"""Curvature in the projected space: block-diagonal empirical Fisher, damped per block.

F_b = (1/N) Σ_i g_{i,b} g_{i,b}^T for each module block b, λ_b = factor × mean eigenvalue
of F_b, and (F_b + λ_b I)^p applied through one eigendecomposition (p = -1 or -1/2).

`ekfac` keeps a Kronecker eigenbasis instead of F_b's own: a block's gradient is a k_out × k_in
matrix G_i (stored row-major), its factors are the partial traces S = E[G_i G_iᵀ] and A = E[G_iᵀ G_i]
of F_b, the basis is Q = Q_S ⊗ Q_A of their eigenvectors, and the eigenvalues are corrected to
Λ = diag(Qᵀ F_b Q) = E[(Q_Sᵀ G_i Q_A)²] (George et al. 2018, EKFAC; kronfluence's default), so
(F_b + λ)^p ≈ Q (Λ + λ)^p Qᵀ. The stored gradients keep no per-token activations, so the factors
come from the per-example gradients rather than from E[x xᵀ] and E[dy dyᵀ] over tokens; the
eigenvalue correction makes the diagonal exact in that basis either way. The trace, and so λ, is
that of the raw Fisher.

An ekfac block is kept factored, (Λ, Q_S, Q_A), and applied as Q_S [(Λ + λ)^p ∘ (Q_Sᵀ G Q_A)] Q_Aᵀ: per row
k_out·k_in·(k_out + k_in) operations instead of the (k_out·k_in)² of a dense eigenbasis, and memory k_out² + k_in²
instead of (k_out·k_in)². It is fitted in two passes over the gradients, S and A, then Λ = E[(Q_Sᵀ G Q_A)²],
never forming F (n·b·(k_out + k_in) per pass instead of n·b² to accumulate F): see `fit_fisher`. Only the sides
are bounded by max_block_dim, so blocks far past a dense Fisher's size fit.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from dataworth.attribution.projection import Layout
from dataworth.config import CurvatureConfig
from dataworth.errors import ConfigError, DataError, IndexMismatchError

# Kinds fitted from the stored gradients' per-block second moments.
FITTED_KINDS = ("raw", "ekfac")


class FisherAccumulator:
    """Streams gradient batches into per-block second moments (float64 sums).

    raw: each block's dense Fisher, in one pass. ekfac: the factors S = Σ G Gᵀ and A = Σ Gᵀ G of each block, then
    — `needs_second_pass`, after `begin_correction` — a second pass over the same gradients for the eigenvalues
    Σ (Q_Sᵀ G Q_A)²; no block's Fisher is formed. `fit_fisher` runs the passes."""

    def __init__(self, layout: Layout, cfg: CurvatureConfig):
        for b in layout.blocks:
            if cfg.kind == "raw" and b.size > cfg.max_block_dim:
                raise ConfigError(
                    f"module {b.name!r} has a {b.size}-dim gradient block ({b.k_out}×{b.k_in}); a raw Fisher of that "
                    f"size needs {b.size**2 * 8 / 2**30:.1f} GiB. Use curvature kind ekfac (Kronecker-factored, "
                    f"fitted in two passes), lower proj_dim_in/proj_dim_out (rapidgrad_dim with projection "
                    f"rapidgrad), or raise curvature.max_block_dim (now {cfg.max_block_dim})"
                )
            if cfg.kind == "ekfac" and max(b.k_out, b.k_in) > cfg.max_block_dim:
                raise ConfigError(
                    f"module {b.name!r} has a {b.k_out}×{b.k_in} gradient block; an EKFAC factor of side "
                    f"{max(b.k_out, b.k_in)} needs {max(b.k_out, b.k_in) ** 2 * 8 / 2**30:.1f} GiB. Lower "
                    f"proj_dim_in/proj_dim_out, or raise curvature.max_block_dim (now {cfg.max_block_dim})"
                )
        self.layout = layout
        self.cfg = cfg
        self.count = 0
        raw = layout.blocks if cfg.kind == "raw" else ()
        self.sums = {b.name: torch.zeros(b.size, b.size, dtype=torch.float64) for b in raw}
        # ekfac never forms a block's Fisher: the factor sums (S, A) of every block, then the eigenvalues.
        self.factored = list(layout.blocks) if cfg.kind == "ekfac" else []
        self.factors = {
            b.name: (
                torch.zeros(b.k_out, b.k_out, dtype=torch.float64),
                torch.zeros(b.k_in, b.k_in, dtype=torch.float64),
            )
            for b in self.factored
        }
        self.bases: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # (Q_S, Q_A) in the second pass
        self.corrections: dict[str, torch.Tensor] = {}
        self.corrected = 0

    @property
    def needs_second_pass(self) -> bool:
        """Whether some block's eigenvalues still need a pass (call begin_correction, then update again)."""
        return bool(self.factored) and self.bases is None

    def begin_correction(self) -> None:
        """Fix each factored block's basis from the first pass's factors; the next updates (the same gradients
        again) accumulate its eigenvalues."""
        if not self.factored or self.bases is not None:
            raise DataError("begin_correction: this fit has no second pass to begin (or it has begun)")
        if self.count == 0:
            raise DataError("cannot fit a Fisher on zero examples; the gradient table is empty")
        self.bases = {}
        for b in self.factored:
            s, a = self.factors[b.name]
            self.bases[b.name] = (_eigenvectors(s), _eigenvectors(a))
            self.corrections[b.name] = torch.zeros(b.k_out, b.k_in, dtype=torch.float64)

    def update(self, grads: torch.Tensor) -> None:
        if grads.shape[1] != self.layout.dim:
            raise IndexMismatchError(f"gradient batch has {grads.shape[1]} columns, the layout has {self.layout.dim}")
        if self.cfg.kind not in FITTED_KINDS:
            self.count += grads.shape[0]
            return
        g = grads.to(torch.float64)
        if self.bases is not None:  # the second pass: only the factored blocks' eigenvalues
            self.corrected += grads.shape[0]
            for b, sl in self.layout.slices():
                if b.name in self.bases:
                    q_s, q_a = self.bases[b.name]
                    mats = g[:, sl].cpu().reshape(-1, b.k_out, b.k_in)
                    self.corrections[b.name] += (q_s.T @ mats @ q_a).square().sum(0)  # [n, o, i] → [o, i]
            return
        self.count += grads.shape[0]
        for b, sl in self.layout.slices():
            gb = g[:, sl].cpu()
            if b.name in self.sums:
                self.sums[b.name] += gb.T @ gb
            else:
                mats = gb.reshape(-1, b.k_out, b.k_in)
                s, a = self.factors[b.name]
                s += torch.einsum("noi,npi->op", mats, mats)  # Σ G Gᵀ
                a += torch.einsum("noi,noj->ij", mats, mats)  # Σ Gᵀ G

    def finalize(self) -> "Curvature":
        if self.cfg.kind == "identity":
            return Curvature(self.layout, "identity", {}, self.count, self.cfg.damping_factor)
        if self.count == 0:
            raise DataError("cannot fit a Fisher on zero examples; the gradient table is empty")
        if self.needs_second_pass or (self.factored and self.corrected != self.count):
            raise DataError(
                f"an ekfac fit needs a second pass over the same gradients ({self.count} examples; "
                f"{self.corrected} seen again): fit with "
                "dataworth.attribution.curvature.fit_fisher"
            )
        blocks = {}
        for b in self.layout.blocks:
            if b.name in self.corrections:
                q_s, q_a = self.bases[b.name]
                blocks[b.name] = ((self.corrections[b.name] / self.count).reshape(-1), q_s, q_a)
                continue
            fisher = self.sums[b.name] / self.count
            evals, evecs = torch.linalg.eigh((fisher + fisher.T) / 2)
            blocks[b.name] = (evals.clamp(min=0.0), evecs)  # round-off can leave tiny negatives on a PSD matrix
        return Curvature.from_eigen(self.layout, blocks, self.count, self.cfg.damping_factor, self.cfg.kind)


def fit_fisher(layout: Layout, cfg: CurvatureConfig, batches: Callable[[], Iterable[torch.Tensor]]) -> "Curvature":
    """The curvature of the gradients `batches()` yields ([n, dim] each), in as many passes as the fit needs
    (two for ekfac): `batches` is called once per pass and must yield the same gradients each time."""
    acc = FisherAccumulator(layout, cfg)
    for grads in batches():
        acc.update(grads)
    if acc.needs_second_pass:
        acc.begin_correction()
        for grads in batches():
            acc.update(grads)
    return acc.finalize()


def _eigenvectors(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigh((m + m.T) / 2).eigenvectors


def _rotate(block: tuple, x: torch.Tensor, k_out: int, k_in: int) -> torch.Tensor:
    """Rows of x [n, b] in the block's eigenbasis: x Q, with Q dense or Q_S ⊗ Q_A (then Q_Sᵀ X Q_A per row)."""
    if len(block) == 2:
        return x @ block[1].to(device=x.device, dtype=x.dtype)
    q_s, q_a = (q.to(device=x.device, dtype=x.dtype) for q in block[1:])
    return (q_s.T @ x.reshape(-1, k_out, k_in) @ q_a).reshape(x.shape[0], -1)  # [n, o, i] → [n, s·a]


def _unrotate(block: tuple, c: torch.Tensor, k_out: int, k_in: int) -> torch.Tensor:
    """Coefficients c [n, b] in the block's eigenbasis back to rows: c Qᵀ (Q_S C Q_Aᵀ per row when factored)."""
    if len(block) == 2:
        return c @ block[1].to(device=c.device, dtype=c.dtype).T
    q_s, q_a = (q.to(device=c.device, dtype=c.dtype) for q in block[1:])
    return (q_s @ c.reshape(-1, k_out, k_in) @ q_a.T).reshape(c.shape[0], -1)


@dataclass
class Curvature:
    layout: Layout
    kind: str
    # name -> (eigenvalues, eigenvectors), or for a factored ekfac block (Λ, Q_S, Q_A): the basis is Q_S ⊗ Q_A
    blocks: dict[str, tuple[torch.Tensor, ...]]
    count: int
    damping_factor: float
    damping: dict[str, float] | None = None
    # mixed() results by (weight, query gradients' digest): a query run's Scorer and its hybrid reranks share one
    # eigendecomposition per block instead of repeating it.
    _mixed: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_eigen(cls, layout, blocks, count, damping_factor, kind: str = "raw") -> "Curvature":
        """A fitted curvature from its blocks' (eigenvalues, eigenvectors); `kind` says which fit (raw, ekfac)."""
        means = {n: float(block[0].mean()) for n, block in blocks.items()}
        positive = [m for m in means.values() if m > 0]
        # A block whose gradients were all zero has no scale of its own: borrow the global one.
        fallback = sum(positive) / len(positive) if positive else 1.0
        damping = {n: damping_factor * (m if m > 0 else fallback) for n, m in means.items()}
        return cls(layout, kind, blocks, count, damping_factor, damping)

    @classmethod
    def identity(cls, layout: Layout) -> "Curvature":
        return cls(layout, "identity", {}, 0, 0.0)

    def with_damping(self, damping_factor: float) -> "Curvature":
        """Same fitted Fisher, another damping factor (cheap: no refit)."""
        if self.kind == "identity":
            return self
        return Curvature.from_eigen(self.layout, self.blocks, self.count, damping_factor, self.kind)

    def mixed(self, queries: torch.Tensor, weight: float) -> "Curvature | TaskCurvature":
        """TrackStar's task-specific curvature: each block's Fisher mixed with the Fisher of the query gradients,

            F_task = (1 - w) F + w · (tr F / tr F_q) F_q,    F_q = (1/Q) Σ_q g_q g_qᵀ  (per block),

        so that the directions every query shares (a template, a relation) weigh more in F_task and so less in
        (F_task + λ)^-1: they stop deciding which training examples score high. F_q is scaled to F's trace, so w is
        the query set's share of the curvature, and the mean eigenvalue, hence λ, stays F's. An identity curvature
        has no Fisher to mix with and is returned as it is, as is any curvature at w = 0. A TaskCurvature (kind
        "task"): F_q has rank ≤ Q, so (F_task + λ)^-1 is applied through F's own eigenbasis and one Q × Q matrix
        per block (Woodbury), at any block size. Used for one query set, never stored."""
        if not 0.0 <= weight < 1.0:
            raise ConfigError(f"the task-curvature weight is {weight}; give a share in [0, 1) (score.task_mix)")
        if self.kind == "identity" or weight == 0.0:
            return self
        if queries.shape[1] != self.layout.dim:
            raise IndexMismatchError(
                f"query gradients have {queries.shape[1]} columns, the layout has {self.layout.dim}"
            )
        q = queries.detach().to("cpu", torch.float64).contiguous()
        key = (float(weight), hashlib.sha256(q.numpy().tobytes()).hexdigest())
        if key in self._mixed:
            return self._mixed[key]
        mixed = TaskCurvature.of(self, q, weight)
        self._mixed = {key: mixed}  # the last query set only: memory stays that of one curvature
        return mixed

    def apply(self, vectors: torch.Tensor, power: float) -> torch.Tensor:
        """(F + λI)^power applied blockwise to the rows of `vectors` (n, dim)."""
        if self.kind == "identity":
            return vectors
        out = torch.empty_like(vectors)
        for b, sl in self.layout.slices():
            block = self.blocks[b.name]
            scale = (block[0] + self.damping[b.name]).pow(power).to(device=vectors.device, dtype=vectors.dtype)
            out[:, sl] = _unrotate(block, _rotate(block, vectors[:, sl], b.k_out, b.k_in) * scale, b.k_out, b.k_in)
        return out

    def whitened_norms(self, vectors: torch.Tensor) -> torch.Tensor:
        """‖(F + λI)^-1/2 g‖ = sqrt(g^T (F + λI)^-1 g) of each row of `vectors` (n, dim), without forming the
        whitened rows: one [n, b] @ [b, b] product per block, in the dtype of `vectors`."""
        if self.kind == "identity":
            return vectors.norm(dim=1)
        sq = torch.zeros(vectors.shape[0], dtype=vectors.dtype, device=vectors.device)
        for b, sl in self.layout.slices():
            block = self.blocks[b.name]
            inv = (block[0] + self.damping[b.name]).reciprocal().to(device=vectors.device, dtype=vectors.dtype)
            sq += _rotate(block, vectors[:, sl], b.k_out, b.k_in).square() @ inv  # [n, b] · [b] → [n]
        return sq.sqrt()

    def matrix(self, power: float = 1.0) -> torch.Tensor:
        """The dense block-diagonal (F + λI)^power, for tests and small diagnostics only."""
        eye = torch.eye(self.layout.dim, dtype=torch.float64)
        return self.apply(eye, power)

    def summary(self) -> dict:
        if self.kind == "identity":
            return {"kind": "identity"}
        return {
            "kind": self.kind,
            "examples": self.count,
            "damping_factor": self.damping_factor,
            "blocks": {
                n: {"mean_eigenvalue": float(e.mean()), "max_eigenvalue": float(e.max()), "damping": self.damping[n]}
                for n, (e, *_) in self.blocks.items()
            },
        }

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(
            {
                "layout": self.layout.to_json(),
                "kind": self.kind,
                "blocks": {n: tuple(t.cpu() for t in block) for n, block in self.blocks.items()},
                "count": self.count,
                "damping_factor": self.damping_factor,
            },
            buf,
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Curvature":
        state = torch.load(io.BytesIO(data), weights_only=True)
        layout = Layout.from_json(state["layout"])
        if state["kind"] == "identity":
            return cls.identity(layout)
        return cls.from_eigen(layout, state["blocks"], state["count"], state["damping_factor"], state["kind"])


@dataclass
class TaskCurvature:
    """TrackStar's T + λ = (1 - w) F + c F_q + λ per block (see Curvature.mixed), kept as A + U Uᵀ with
    A = Q ((1 - w) Λ + λ) Qᵀ in F's eigenbasis Q and U = √(c / n_q) G_qᵀ [b, n_q], and inverted by Woodbury:
    (A + U Uᵀ)^-1 = A^-1 - W M^-1 Wᵀ with W = A^-1 U and M = I + Uᵀ W. trackstar needs only the inverse
    (its query vectors and both sides' norms), so only power -1 is applied."""

    layout: Layout
    base: Curvature
    scales: dict[str, torch.Tensor]  # per block: 1 / ((1 - w) Λ + λ), or 1 / (Λ + λ) where nothing is mixed
    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]]  # per mixed block: (W [b, n_q], M^-1 [n_q, n_q])
    kind: str = "task"

    @classmethod
    def of(cls, base: Curvature, queries: torch.Tensor, weight: float) -> "TaskCurvature":
        scales, low_rank = {}, {}
        n_q = max(queries.shape[0], 1)
        for b, sl in base.layout.slices():
            block = base.blocks[b.name]
            qb = queries[:, sl]
            t_f, t_q = float(block[0].sum()), float(qb.square().sum()) / n_q  # tr F, tr F_q
            mix = t_q > 0 and t_f > 0
            evals = block[0].to(torch.float64) * ((1.0 - weight) if mix else 1.0)
            scales[b.name] = (evals.clamp(min=0.0) + base.damping[b.name]).reciprocal()
            if mix:
                u = qb.T * (weight * t_f / t_q / n_q) ** 0.5  # [b, n_q]
                w = _unrotate(block, _rotate(block, u.T, b.k_out, b.k_in) * scales[b.name], b.k_out, b.k_in).T
                m = torch.eye(u.shape[1], dtype=torch.float64) + u.T @ w
                low_rank[b.name] = (w, torch.linalg.inv((m + m.T) / 2))
        return cls(base.layout, base, scales, low_rank)

    @property
    def damping(self) -> dict[str, float]:
        return self.base.damping

    def _base_inverse(self, b, v: torch.Tensor) -> torch.Tensor:
        block, scale = self.base.blocks[b.name], self.scales[b.name].to(device=v.device, dtype=v.dtype)
        return _unrotate(block, _rotate(block, v, b.k_out, b.k_in) * scale, b.k_out, b.k_in)

    def apply(self, vectors: torch.Tensor, power: float) -> torch.Tensor:
        """(T + λI)^-1 applied blockwise to the rows of `vectors` (n, dim)."""
        if power != -1.0:
            raise ConfigError(f"the task curvature is applied at power -1 only (trackstar's), not {power}")
        out = torch.empty_like(vectors)
        for b, sl in self.layout.slices():
            v = vectors[:, sl]
            out[:, sl] = self._base_inverse(b, v)
            if b.name in self.low_rank:
                w, m_inv = (t.to(device=v.device, dtype=v.dtype) for t in self.low_rank[b.name])
                out[:, sl] -= ((v @ w) @ m_inv) @ w.T  # [n, b] @ [b, q] @ [q, q] @ [q, b]
        return out

    def whitened_norms(self, vectors: torch.Tensor) -> torch.Tensor:
        """‖(T + λI)^-1/2 g‖ = sqrt(gᵀ (T + λI)^-1 g) of each row of `vectors` (n, dim)."""
        sq = torch.zeros(vectors.shape[0], dtype=vectors.dtype, device=vectors.device)
        for b, sl in self.layout.slices():
            v, block = vectors[:, sl], self.base.blocks[b.name]
            scale = self.scales[b.name].to(device=v.device, dtype=v.dtype)
            sq += _rotate(block, v, b.k_out, b.k_in).square() @ scale
            if b.name in self.low_rank:
                w, m_inv = (t.to(device=v.device, dtype=v.dtype) for t in self.low_rank[b.name])
                vw = v @ w  # [n, q]
                sq -= ((vw @ m_inv) * vw).sum(1)
        return sq.clamp(min=0.0).sqrt()  # round-off can take a tiny norm below 0

    def matrix(self, power: float = -1.0) -> torch.Tensor:
        """The dense block-diagonal (T + λI)^-1, for tests and small diagnostics only."""
        return self.apply(torch.eye(self.layout.dim, dtype=torch.float64), power)
