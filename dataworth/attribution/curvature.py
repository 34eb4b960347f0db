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
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import torch

from dataworth.attribution.projection import Layout
from dataworth.config import CurvatureConfig
from dataworth.errors import ConfigError, DataError, IndexMismatchError

# Kinds fitted from the stored gradients' per-block second moments.
FITTED_KINDS = ("raw", "ekfac")


class FisherAccumulator:
    """Streams gradient batches into per-block second moments (float64 sums)."""

    def __init__(self, layout: Layout, cfg: CurvatureConfig):
        for b in layout.blocks:
            if cfg.kind in FITTED_KINDS and b.size > cfg.max_block_dim:
                raise ConfigError(
                    f"module {b.name!r} has a {b.size}-dim gradient block ({b.k_out}×{b.k_in}); a raw Fisher of that "
                    f"size needs {b.size**2 * 8 / 2**30:.1f} GiB. Lower proj_dim_in/proj_dim_out (rapidgrad_dim with "
                    f"projection rapidgrad), or raise curvature.max_block_dim (now {cfg.max_block_dim})"
                )
        self.layout = layout
        self.cfg = cfg
        self.count = 0
        self.sums = (
            {b.name: torch.zeros(b.size, b.size, dtype=torch.float64) for b in layout.blocks}
            if cfg.kind in FITTED_KINDS
            else {}
        )

    def update(self, grads: torch.Tensor) -> None:
        if grads.shape[1] != self.layout.dim:
            raise IndexMismatchError(f"gradient batch has {grads.shape[1]} columns, the layout has {self.layout.dim}")
        self.count += grads.shape[0]
        if self.cfg.kind not in FITTED_KINDS:
            return
        g = grads.to(torch.float64)
        for b, sl in self.layout.slices():
            gb = g[:, sl].cpu()
            self.sums[b.name] += gb.T @ gb

    def finalize(self) -> "Curvature":
        if self.cfg.kind == "identity":
            return Curvature(self.layout, "identity", {}, self.count, self.cfg.damping_factor)
        if self.count == 0:
            raise DataError("cannot fit a Fisher on zero examples; the gradient table is empty")
        blocks = {}
        for b in self.layout.blocks:
            fisher = self.sums[b.name] / self.count
            fisher = (fisher + fisher.T) / 2
            if self.cfg.kind == "ekfac":
                evals, evecs = ekfac_eigen(fisher, b.k_out, b.k_in)
            else:
                evals, evecs = torch.linalg.eigh(fisher)
            evals = evals.clamp(min=0.0)  # round-off can leave tiny negatives on a PSD matrix
            blocks[b.name] = (evals, evecs)
        return Curvature.from_eigen(self.layout, blocks, self.count, self.cfg.damping_factor, self.cfg.kind)


def ekfac_eigen(fisher: torch.Tensor, k_out: int, k_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Λ, Q) of one block's EKFAC: Q = Q_S ⊗ Q_A from the eigenvectors of the partial traces of `fisher`
    (k_out·k_in square, rows and columns ordered (o, i) as the stored row-major G_i), Λ = diag(Qᵀ F Q)."""
    f = fisher.reshape(k_out, k_in, k_out, k_in)  # F[(o, i), (p, j)] = E[G_oi G_pj]
    a = torch.einsum("oioj->ij", f)  # E[Gᵀ G]  [k_in, k_in]
    s = torch.einsum("oipi->op", f)  # E[G Gᵀ]  [k_out, k_out]
    q_a = torch.linalg.eigh((a + a.T) / 2).eigenvectors
    q_s = torch.linalg.eigh((s + s.T) / 2).eigenvectors
    # Λ[s, a] = Σ Q_S[o, s] Q_A[i, a] F[o, i, p, j] Q_S[p, s] Q_A[j, a], one factor at a time (no b × b × b product)
    t = torch.einsum("os,oipj->sipj", q_s, f)
    t = torch.einsum("sipj,ps->sij", t, q_s)
    t = torch.einsum("sij,ia->saj", t, q_a)
    lam = torch.einsum("saj,ja->sa", t, q_a)
    return lam.reshape(-1), torch.kron(q_s, q_a)


@dataclass
class Curvature:
    layout: Layout
    kind: str
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (eigenvalues, eigenvectors)
    count: int
    damping_factor: float
    damping: dict[str, float] | None = None
    # mixed() results by (weight, query gradients' digest): a query run's Scorer and its hybrid reranks share one
    # eigendecomposition per block instead of repeating it.
    _mixed: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_eigen(cls, layout, blocks, count, damping_factor, kind: str = "raw") -> "Curvature":
        """A fitted curvature from its blocks' (eigenvalues, eigenvectors); `kind` says which fit (raw, ekfac)."""
        means = {n: float(e.mean()) for n, (e, _) in blocks.items()}
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

    def mixed(self, queries: torch.Tensor, weight: float) -> "Curvature":
        """TrackStar's task-specific curvature: each block's Fisher mixed with the Fisher of the query gradients,

            F_task = (1 - w) F + w · (tr F / tr F_q) F_q,    F_q = (1/Q) Σ_q g_q g_qᵀ  (per block),

        so that the directions every query shares (a template, a relation) weigh more in F_task and so less in
        (F_task + λ)^-1: they stop deciding which training examples score high. F_q is scaled to F's trace, so w is
        the query set's share of the curvature, and the mean eigenvalue, hence λ, stays F's. An identity curvature
        has no Fisher to mix with and is returned as it is, as is any curvature at w = 0. Kind "task": used for one
        query set, never stored."""
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
        blocks = {}
        for b, sl in self.layout.slices():
            evals, evecs = self.blocks[b.name]
            fisher = (evecs * evals) @ evecs.T
            qb = q[:, sl]
            task = qb.T @ qb / max(q.shape[0], 1)
            t_f, t_q = float(evals.sum()), float(task.trace())
            if t_q > 0 and t_f > 0:
                fisher = (1.0 - weight) * fisher + weight * (t_f / t_q) * task
            e, v = torch.linalg.eigh((fisher + fisher.T) / 2)
            blocks[b.name] = (e.clamp(min=0.0), v)
        mixed = Curvature(self.layout, "task", blocks, self.count, self.damping_factor, dict(self.damping))
        self._mixed = {key: mixed}  # the last query set only: memory stays that of one curvature
        return mixed

    def apply(self, vectors: torch.Tensor, power: float) -> torch.Tensor:
        """(F + λI)^power applied blockwise to the rows of `vectors` (n, dim)."""
        if self.kind == "identity":
            return vectors
        out = torch.empty_like(vectors)
        for b, sl in self.layout.slices():
            evals, evecs = self.blocks[b.name]
            evecs = evecs.to(device=vectors.device, dtype=vectors.dtype)
            scale = (evals + self.damping[b.name]).pow(power).to(device=vectors.device, dtype=vectors.dtype)
            out[:, sl] = ((vectors[:, sl] @ evecs) * scale) @ evecs.T
        return out

    def whitened_norms(self, vectors: torch.Tensor) -> torch.Tensor:
        """‖(F + λI)^-1/2 g‖ = sqrt(g^T (F + λI)^-1 g) of each row of `vectors` (n, dim), without forming the
        whitened rows: one [n, b] @ [b, b] product per block, in the dtype of `vectors`."""
        if self.kind == "identity":
            return vectors.norm(dim=1)
        sq = torch.zeros(vectors.shape[0], dtype=vectors.dtype, device=vectors.device)
        for b, sl in self.layout.slices():
            evals, evecs = self.blocks[b.name]
            evecs = evecs.to(device=vectors.device, dtype=vectors.dtype)
            inv = (evals + self.damping[b.name]).reciprocal().to(device=vectors.device, dtype=vectors.dtype)
            sq += (vectors[:, sl] @ evecs).square() @ inv  # [n, b] @ [b, b] → [n, b], then · [b] → [n]
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
                for n, (e, _) in self.blocks.items()
            },
        }

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(
            {
                "layout": self.layout.to_json(),
                "kind": self.kind,
                "blocks": {n: (e.cpu(), v.cpu()) for n, (e, v) in self.blocks.items()},
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
