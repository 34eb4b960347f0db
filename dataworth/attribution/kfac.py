"""KFAC-whitened Kronecker projections: precondition first, then project.

Influence needs g_qᵀ (F + λ)⁻¹ g_i. KFAC approximates a linear layer's Fisher block by
A ⊗ S, with A = E[x xᵀ] over tokens of the layer input and S = E[dy dyᵀ] of its output
gradient. With factor-wise damping, (A_λ ⊗ S_λ)⁻¹ = (A_λ^-½ ⊗ S_λ^-½)², so

    g_qᵀ (A_λ ⊗ S_λ)⁻¹ g_i = ⟨S_λ^-½ G_q A_λ^-½, S_λ^-½ G_i A_λ^-½⟩_F.

A random Kronecker projection R_out (·) R_inᵀ preserves that inner product in expectation,
so the stored vector P_out G Pᵀ_in with P_in = R_in A_λ^-½ and P_out = R_out S_λ^-½ turns
every dot product between stored gradients into an approximate KFAC influence. The hooks
stay exactly those of LoGra; only the two matrices differ. Without the whitening, a random
projection spends its few dimensions on the directions the curvature later discounts:
on the facts-small benchmark with 32×32 projections and the raw Fisher on top, influence
goes from MRR 0.38 / LDS 0.12 (random projection) to MRR 0.90 / LDS 0.41 (whitened), where
kronfluence's EKFAC on the full gradients gets 0.69 / 0.33 (README, `dataworth evaluate`).

A factor is a d×d float64 matrix, so a side wider than `max_factor_dim` (Llama-3-8B's MLP: 14,336) is
first mapped by a random R0 (m×d, m ≤ max_factor_dim, its own seed) and whitened there: the hooks sum
(R0 x)(R0 x)ᵀ, an m×m factor, and the side's projection is P = R (R0 A R0ᵀ + λ)^-½ R0, still one k×d
matrix in the same LoGra hooks. Then ⟨P g, P g'⟩ ≈ (R0 g)ᵀ (R0 A R0ᵀ + λ)⁻¹ (R0 g'): KFAC influence of
the sketched side. Sides within the limit are whitened exactly, as before.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from dataworth.attribution.hooks import BackwardHooks
from dataworth.attribution.optimizer_state import optimizer_scales
from dataworth.attribution.projection import (
    FittedProjections,
    Projector,
    draw_pre_projection,
    draw_projection,
    layer_dims,
    select_modules,
)
from dataworth.config import LoggingConfig
from dataworth.data import Example, collate_examples, pad_token_id
from dataworth.errors import ConfigError, DataError

SIDES = ("in", "out")


def pre_projection_dims(modules: dict, cfg: LoggingConfig) -> dict[str, dict[str, int]]:
    """{module: {side: m}} for each side wider than max_factor_dim: its KFAC factor is fitted on an m-dim random
    projection of it (wide_layers='project_then_whiten'); sides not listed are whitened exactly.

    Refuses, before any forward pass, under wide_layers='refuse' and with projection='identity' (which keeps
    every dimension, so there is no k×d projection to fold the pre-projection into).
    """
    wide = {}
    for name, module in modules.items():
        sides = {side: d for side, d in zip(SIDES, layer_dims(module)) if d > cfg.max_factor_dim}
        if sides:
            wide[name] = sides
    if not wide:
        return {}
    name, d = next((n, max(sides.values())) for n, sides in wide.items())
    if cfg.wide_layers == "refuse":
        raise ConfigError(
            f"{len(wide)} tracked layers are wider than max_factor_dim={cfg.max_factor_dim} (e.g. {name!r}: {d}); "
            f"a KFAC factor of that size is a {d}×{d} matrix ({d * d * 8 / 2**30:.1f} GiB). Exclude those layers, "
            "raise logging.max_factor_dim, set logging.wide_layers='project_then_whiten' (whiten after a random "
            "projection), or set logging.precondition='none'"
        )
    if cfg.projection == "identity":
        raise ConfigError(
            f"{len(wide)} tracked layers are wider than max_factor_dim={cfg.max_factor_dim} (e.g. {name!r}: {d}), "
            "and logging.projection='identity' keeps every dimension, so they cannot be whitened after a random "
            "projection: use logging.projection='gaussian', raise logging.max_factor_dim, or exclude those layers"
        )
    k = {"in": cfg.proj_dim_in, "out": cfg.proj_dim_out}
    # m ≥ k: a smaller sketch would cap the rank of the stored block below its size.
    return {
        n: {side: min(cfg.max_factor_dim, max(min(k[side], d), cfg.wide_layer_dim)) for side, d in sides.items()}
        for n, sides in wide.items()
    }


class CovarianceCollector(BackwardHooks):
    """Hooks that sum x xᵀ of each tracked layer's input and dy dyᵀ of its output gradient over tokens.

    With `scales` ({module: (s_in, s_out)}, the optimizer-state correction) the sums are of diag(s_in) x and
    diag(s_out) dy: the factors of the corrected gradient diag(s_out) G diag(s_in)."""

    def __init__(self, model, cfg: LoggingConfig, scales: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        modules = select_modules(model, cfg.modules, cfg.exclude_modules)
        self.pre_dims = pre_projection_dims(modules, cfg)
        super().__init__(model, modules, cfg.loss_reduction)
        # R0 of each side too wide for an exact factor, in the hooks' dtype on the model's device: the sums are
        # of R0 x and R0 dy, m×m, and the d×d one is never formed.
        self.pre: dict[tuple[str, str], torch.Tensor] = {}
        self.scale: dict[tuple[str, str], torch.Tensor] = {}  # per-coordinate scales of exactly whitened sides
        self.a_sums: dict[str, torch.Tensor] = {}
        self.s_sums: dict[str, torch.Tensor] = {}
        for name, module in modules.items():
            for side, d, sums in zip(SIDES, layer_dims(module), (self.a_sums, self.s_sums)):
                m = self.pre_dims.get(name, {}).get(side)
                s = None if scales is None else scales[name][SIDES.index(side)].to(torch.float64)
                if m is not None:
                    r0 = draw_pre_projection(cfg.projection, m, d, cfg.seed, name, side)
                    self.pre[name, side] = (r0 if s is None else r0 * s[None, :]).to(self.device, self.dtype)
                elif s is not None:
                    self.scale[name, side] = s.to(self.device, self.dtype)
                # float64 sums on the model's device: no host transfer per batch, no round-off over many tokens
                sums[name] = torch.zeros(m or d, m or d, dtype=torch.float64, device=self.device)
        self.tokens = 0
        self.examples = 0

    def _side(self, name: str, side: str, t: torch.Tensor) -> torch.Tensor:
        """R0 t for a pre-projected side, diag(s) t for a corrected one, else t ([B, T, d])."""
        r0 = self.pre.get((name, side))
        if r0 is not None:
            return t @ r0.T  # [B, T, d] @ [d, m] → [B, T, m]
        s = self.scale.get((name, side))
        return t if s is None else t * s

    def _capture(self, name: str, x: torch.Tensor) -> None:
        x = self._masked(self._side(name, "in", x.detach()))
        flat = x.reshape(-1, x.shape[-1])
        self.a_sums[name] += (flat.T @ flat).to(torch.float64)

    def _consume(self, name: str, _kept, dy: torch.Tensor) -> None:
        dy = self._side(name, "out", dy.detach())
        flat = dy.reshape(-1, dy.shape[-1])
        self.s_sums[name] += (flat.T @ flat).to(torch.float64)

    def update(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> None:
        self._backward(input_ids, attention_mask, labels)
        self.tokens += int(attention_mask.sum())
        self.examples += int(input_ids.shape[0])

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (A, S): token-averaged second moments of layer input and output gradient (on the model's device);
        of R0 x or R0 dy (m×m) for a side in `pre_dims`."""
        if self.tokens == 0:
            raise DataError("no tokens were seen: fit the KFAC factors on at least one non-empty example")
        return {n: (self.a_sums[n] / self.tokens, self.s_sums[n] / self.tokens) for n in self.a_sums}


def _damped_eigen(factor: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues + λ, eigenvectors) of a PSD matrix M, ascending, with λ = damping × mean eigenvalue of M."""
    sym = (factor + factor.T) / 2
    evals, evecs = torch.linalg.eigh(sym)
    evals = evals.clamp(min=0.0)
    mean = float(evals.mean())
    return evals + damping * (mean if mean > 0 else 1.0), evecs


def inverse_sqrt(factor: torch.Tensor, damping: float) -> torch.Tensor:
    """(M + λ I)^-½ with λ = damping × mean eigenvalue of M (a PSD matrix)."""
    evals, evecs = _damped_eigen(factor, damping)
    return (evecs * evals.rsqrt()) @ evecs.T


def cholesky_whitening(factor: torch.Tensor, damping: float) -> torch.Tensor:
    """L⁻¹ for L Lᵀ = M + λ I, λ = damping × mean eigenvalue of M (its trace ÷ d): a W with WᵀW = (M + λ I)⁻¹,
    equal to Q (M + λ I)^-½ for an orthogonal Q, from a Cholesky factorization and a triangular solve instead of an
    eigendecomposition (inverse_sqrt, which it falls back to should the factorization fail)."""
    sym = (factor + factor.T) / 2
    d = sym.shape[0]
    mean = float(torch.diagonal(sym).clamp(min=0.0).sum()) / d
    eye = torch.eye(d, dtype=sym.dtype, device=sym.device)
    chol, info = torch.linalg.cholesky_ex(sym + damping * (mean if mean > 0 else 1.0) * eye)
    if int(info) != 0:  # not positive definite to working precision
        return inverse_sqrt(factor, damping)
    return torch.linalg.solve_triangular(chol, eye, upper=False)


def pca_whitening(factor: torch.Tensor, damping: float, k: int) -> torch.Tensor:
    """The k×d rows U_kᵀ (M + λ I)^-½ = (Λ_k + λ)^-½ U_kᵀ: the top-k eigenvectors of M, each scaled by its damped
    eigenvalue's inverse square root (LoGra's PCA-initialized projection of a whitened side), largest first."""
    evals, evecs = _damped_eigen(factor, damping)
    top = evals.shape[0] - 1 - torch.arange(min(k, evals.shape[0]), device=evals.device)
    return (evecs[:, top] * evals[top].rsqrt()).T


def sample_indices(total: int, n: int) -> list[int]:
    """min(n, total) positions spread evenly over range(total) (deterministic, covers the whole corpus)."""
    if total <= n:
        return list(range(total))
    return [math.floor(i * total / n) for i in range(n)]


def sample_examples(examples: list[Example], n: int) -> list[Example]:
    """The examples at `sample_indices(len(examples), n)`."""
    return [examples[i] for i in sample_indices(len(examples), n)]


def fit_kfac_factors(
    model,
    tokenizer,
    examples: list[Example],
    cfg: LoggingConfig,
    progress: bool = False,
    scales: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
):
    """(factors per module, tokens, examples) over the given examples (m×m factors of pre-projected sides; of
    the corrected sides diag(s) x, diag(s) dy with the optimizer-state `scales`)."""
    if not examples:
        raise DataError("no examples to fit the KFAC factors on; the corpus is empty")
    pad = pad_token_id(tokenizer)
    ordered = sorted(examples, key=lambda e: e.num_tokens)  # less padding
    with CovarianceCollector(model, cfg, scales) as collector:
        bar = tqdm(total=len(ordered), desc="fit KFAC factors", unit="ex", disable=not progress)
        for start in range(0, len(ordered), cfg.batch_size):
            batch = ordered[start : start + cfg.batch_size]
            collector.update(*collate_examples(batch, pad))
            bar.update(len(batch))
        bar.close()
        return collector.factors(), collector.tokens, collector.examples


def whitened_projections(
    model,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    cfg: LoggingConfig,
    meta: dict | None = None,
    scales: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> FittedProjections:
    """P_in = R_in A_λ^-½ and P_out = R_out S_λ^-½ per module (A_λ^-½ as L⁻¹ of A_λ = L Lᵀ for a factor at least
    cfg.cholesky_from_dim wide, recorded in the meta as `cholesky`; R = identity for projection='identity'; with
    basis='pca' R = U_kᵀ, the top-k eigenvectors of the factor, so P = (Λ_k + λ)^-½ U_kᵀ),
    returned on the CPU; P = R (R0 A R0ᵀ + λ)^-½ R0 for a side in `pre_projection_dims`, whose factor is then
    the m×m one of R0 x (or R0 dy). The meta records those sides as `pre_projected`. With the optimizer-state
    `scales` (s_in, s_out) each side ends in diag(s), and its factor must be that of diag(s) x (or dy):
    P = R (D A D + λ)^-½ D, as `fit_kfac_factors` with the same scales fits it.

    The eigendecompositions run where the factors are: a float64 eigh of a 3072-wide factor takes seconds
    on CPU cores and a fraction of that on a GPU, and a model has two factors per tracked layer.
    """
    modules = select_modules(model, cfg.modules, cfg.exclude_modules)
    pre_dims = pre_projection_dims(modules, cfg)
    # The random part must be the one a no-preconditioning run draws.
    plain = Projector.unfitted(modules, cfg)
    matrices = {}
    cholesky: list[str] = []  # the sides whitened by cholesky_whitening
    for name in modules:
        sides = []
        d = dict(zip(SIDES, plain.dims[name]))
        k = dict(zip(SIDES, plain.proj_dims(*plain.dims[name])))
        for factor, side in zip(factors[name], SIDES):
            m = pre_dims.get(name, {}).get(side)
            if tuple(factor.shape) != ((m or d[side]),) * 2:
                raise ConfigError(
                    f"the {side}put factor of {name!r} is {tuple(factor.shape)}, the logging config asks for "
                    f"{m or d[side]}×{m or d[side]}: fit the factors with the same logging config"
                )
            if cfg.basis == "pca":  # the top-k eigenvectors of the factor instead of k random rows
                p = pca_whitening(factor, cfg.precondition_damping, k[side])
            else:
                wide = factor.shape[0] >= cfg.cholesky_from_dim
                w = (cholesky_whitening if wide else inverse_sqrt)(factor, cfg.precondition_damping)
                if wide:
                    cholesky.append(f"{name}:{side}")
                r = (
                    plain.random(name, side)
                    if m is None
                    else draw_projection(cfg.projection, k[side], m, cfg.seed, name, side)
                )
                p = w if r is None else r.to(w.device) @ w
            if m is not None:
                r0 = draw_pre_projection(cfg.projection, m, d[side], cfg.seed, name, side).to(p.device)
                p = p @ r0  # [k, m] @ [m, d] → [k, d]
            if scales is not None:
                p = p * scales[name][SIDES.index(side)].to(p)[None, :]  # P diag(s)
            sides.append(p.cpu())
        matrices[name] = tuple(sides)
    return FittedProjections(
        matrices,
        {
            "kind": "kfac",
            "damping": cfg.precondition_damping,
            **(meta or {}),
            "max_factor_dim": cfg.max_factor_dim,
            "pre_projected": pre_dims,
            **({"basis": cfg.basis} if cfg.basis != "random" else {}),
            **({"cholesky": cholesky} if cholesky else {}),
        },
    )


def fit_kfac_projections(
    model,
    tokenizer,
    examples: list[Example],
    cfg: LoggingConfig,
    progress: bool = False,
    scales: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    meta: dict | None = None,
):
    """Fit KFAC factors on (a sample of) the examples and return the whitened projections."""
    if cfg.precondition != "kfac":
        raise ConfigError(
            f"fit_kfac_projections called with logging.precondition={cfg.precondition!r}; set it to 'kfac'"
        )
    sample = sample_examples(examples, cfg.precondition_examples)
    factors, tokens, n = fit_kfac_factors(model, tokenizer, sample, cfg, progress, scales)
    return whitened_projections(model, factors, cfg, {"examples": n, "tokens": tokens, **(meta or {})}, scales)


def corrected_projections(
    model, cfg: LoggingConfig, scales: dict[str, tuple[torch.Tensor, torch.Tensor]], meta: dict | None = None
) -> FittedProjections:
    """P_in = R_in diag(s_in), P_out = R_out diag(s_out): the random projections of the optimizer-corrected
    gradient diag(s_out) G diag(s_in) (diag(s) itself for projection='identity'); precondition='none'."""
    modules = select_modules(model, cfg.modules, cfg.exclude_modules)
    plain = Projector.unfitted(modules, cfg)
    matrices = {}
    for name in modules:
        sides = []
        for side, s in zip(SIDES, scales[name]):
            r = plain.random(name, side)
            s = s.to(torch.float64)
            sides.append(torch.diag(s) if r is None else r * s[None, :])
        matrices[name] = tuple(sides)
    return FittedProjections(matrices, {"kind": "optimizer", **(meta or {})})


def fit_projections(
    model, tokenizer, examples: list[Example], cfg: LoggingConfig, progress: bool = False
) -> FittedProjections | None:
    """The projections an index with this logging config stores (None: plain random ones, redrawn from the seed):
    KFAC-whitened (precondition='kfac'), and/or corrected by the optimizer state (optimizer_state), whose
    factored scales are read here and recorded in the meta as `optimizer`."""
    if not cfg.fitted:
        return None
    scales, meta = None, {}
    if cfg.optimizer_state is not None:
        scales, info = optimizer_scales(model, cfg)
        meta = {"optimizer": info}
    if cfg.precondition == "kfac":
        return fit_kfac_projections(model, tokenizer, examples, cfg, progress, scales, meta)
    return corrected_projections(model, cfg, scales, meta)
