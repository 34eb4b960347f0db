"""KFAC-whitened projections against explicit covariances, autograd gradients and Kronecker matrices (fp64)."""

import pytest
import torch
from gradcheck import (
    SEQS,
    _Tok,
    cross_device_tolerance,
    examples,
    explicit_factors,
    hook_gradients,
    reference_gradients,
    relative_error,
)
from tiny import make_tiny_gpt2, make_tiny_llama
from transformers.pytorch_utils import Conv1D

from dataworth import attribute
from dataworth.attribution.hooks import GradientCollector
from dataworth.attribution.kfac import (
    CovarianceCollector,
    cholesky_whitening,
    fit_kfac_factors,
    fit_kfac_projections,
    inverse_sqrt,
    pca_whitening,
    pre_projection_dims,
    sample_examples,
    sample_indices,
    whitened_projections,
)
from dataworth.attribution.projection import (
    FittedProjections,
    Projector,
    draw_pre_projection,
    draw_projection,
    layer_dims,
    select_modules,
)
from dataworth.benchmarks.tiny_model import train_tokenizer
from dataworth.config import LoggingConfig
from dataworth.data import collate


def test_covariances_match_explicit(tiny_model):
    cfg = LoggingConfig(batch_size=3)  # batches of 3 with padding vs. unpadded one by one
    factors, tokens, n = fit_kfac_factors(tiny_model, _Tok(), examples(SEQS), cfg)
    expected, expected_tokens = explicit_factors(tiny_model, cfg, SEQS)
    assert (tokens, n) == (expected_tokens, len(SEQS))
    for name, (a, s) in expected.items():
        assert torch.allclose(factors[name][0], a, atol=1e-12), name
        assert torch.allclose(factors[name][1], s, atol=1e-12), name
        assert factors[name][1].abs().sum() > 0


def test_inverse_sqrt_is_damped_inverse_square_root():
    m = torch.randn(5, 3, dtype=torch.float64)
    cov = m @ m.T  # rank 3: damping is what makes it invertible
    w = inverse_sqrt(cov, 0.1)
    lam = 0.1 * torch.linalg.eigvalsh(cov).mean()
    assert torch.allclose(w @ w, torch.linalg.inv(cov + lam * torch.eye(5, dtype=torch.float64)), atol=1e-10)
    assert torch.allclose(w, w.T)


def test_cholesky_whitening_has_the_damped_inverse_as_gram():
    m = torch.randn(6, 3, dtype=torch.float64)
    cov = m @ m.T  # rank 3
    w = cholesky_whitening(cov, 0.1)
    lam = 0.1 * torch.trace(cov) / 6
    assert torch.allclose(w.T @ w, torch.linalg.inv(cov + lam * torch.eye(6, dtype=torch.float64)), atol=1e-10)
    assert torch.allclose(w, torch.tril(w))  # L⁻¹: lower triangular, not the symmetric root
    assert torch.allclose(w.T @ w, inverse_sqrt(cov, 0.1) @ inverse_sqrt(cov, 0.1), atol=1e-10)


def test_cholesky_whitened_index_has_the_same_kfac_inner_products(tiny_model):
    """Whitening by L⁻¹ (every factor: cholesky_from_dim 1) instead of (M + λ)^-½ changes the exact whitened
    gradients (projection identity) by an orthogonal map per side: every inner product, so every KFAC influence
    and norm, is the same; the meta names the sides so whitened."""
    base = dict(projection="identity", precondition_damping=0.05)
    sym_cfg, chol_cfg = LoggingConfig(**base), LoggingConfig(**base, cholesky_from_dim=1)
    sym = fit_kfac_projections(tiny_model, _Tok(), examples(SEQS), sym_cfg)
    chol = fit_kfac_projections(tiny_model, _Tok(), examples(SEQS), chol_cfg)
    assert "cholesky" not in sym.meta and len(chol.meta["cholesky"]) == 2 * len(chol.matrices)
    g_sym = hook_gradients(tiny_model, sym_cfg, SEQS, fitted=sym)
    g_chol = hook_gradients(tiny_model, chol_cfg, SEQS, fitted=chol)
    assert not torch.allclose(g_sym, g_chol, atol=1e-6)  # other coordinates ...
    assert torch.allclose(g_sym @ g_sym.T, g_chol @ g_chol.T, atol=1e-9, rtol=1e-7)  # ... the same geometry
    for name, (p_in, p_out) in chol.matrices.items():
        assert torch.allclose(p_in, torch.tril(p_in)) and torch.allclose(p_out, torch.tril(p_out)), name


@pytest.mark.parametrize("projection", ["identity", "gaussian"])
def test_whitened_gradients_equal_explicit(tiny_model, projection):
    cfg = LoggingConfig(projection=projection, proj_dim_in=4, proj_dim_out=3, precondition_damping=0.05)
    fitted = fit_kfac_projections(tiny_model, _Tok(), examples(SEQS), cfg)
    factors, _ = explicit_factors(tiny_model, cfg, SEQS)
    for name, (a, s) in factors.items():
        p_in, p_out = fitted.matrices[name]
        r_in = draw_projection(projection, 4, a.shape[0], cfg.seed, name, "in")
        r_out = draw_projection(projection, 3, s.shape[0], cfg.seed, name, "out")
        w_in, w_out = inverse_sqrt(a, 0.05), inverse_sqrt(s, 0.05)
        assert torch.allclose(p_in, w_in if r_in is None else r_in @ w_in, atol=1e-8)
        assert torch.allclose(p_out, w_out if r_out is None else r_out @ w_out, atol=1e-8)
    got = hook_gradients(tiny_model, cfg, SEQS, batch_size=3, fitted=fitted)
    expected = reference_gradients(tiny_model, cfg, SEQS, fitted=fitted)
    assert torch.allclose(got, expected, atol=1e-9, rtol=1e-7)


def test_whitened_dot_is_kfac_influence(tiny_model):
    """⟨whitened g_q, whitened g_i⟩ = g_qᵀ (A_λ ⊗ S_λ)⁻¹ g_i with an explicit Kronecker matrix."""
    name = "transformer.h.0.attn.c_proj" if hasattr(tiny_model, "transformer") else "model.layers.0.self_attn.o_proj"
    cfg = LoggingConfig(projection="identity", modules=[name], precondition_damping=0.1)
    fitted = fit_kfac_projections(tiny_model, _Tok(), examples(SEQS), cfg)
    whitened = hook_gradients(tiny_model, cfg, SEQS, fitted=fitted)
    plain = LoggingConfig(projection="identity", modules=[name], precondition="none")
    raw = hook_gradients(tiny_model, plain, SEQS)  # rows: vec(G) with G (d_out, d_in) row-major
    ((a, s),) = explicit_factors(tiny_model, cfg, SEQS)[0].values()
    eye = lambda d: torch.eye(d, dtype=torch.float64)  # noqa: E731
    a_l = a + 0.1 * torch.linalg.eigvalsh(a).mean() * eye(a.shape[0])
    s_l = s + 0.1 * torch.linalg.eigvalsh(s).mean() * eye(s.shape[0])
    # row-major vec(G): vec(S G A) = (S ⊗ A) vec(G)
    kfac_inverse = torch.kron(torch.linalg.inv(s_l), torch.linalg.inv(a_l))
    assert torch.allclose(whitened @ whitened.T, raw @ kfac_inverse @ raw.T, rtol=1e-6, atol=1e-10)


def test_random_part_matches_plain_projection(tiny_model):
    """With all-identity factors the whitened projection reduces to the plain random one."""
    cfg = LoggingConfig(proj_dim_in=4, proj_dim_out=3, precondition_damping=1e-12)
    modules = select_modules(tiny_model, cfg.modules, cfg.exclude_modules)
    ident = {}
    for n, m in modules.items():
        d_in, d_out = m.weight.shape if isinstance(m, Conv1D) else m.weight.shape[::-1]
        ident[n] = (torch.eye(d_in, dtype=torch.float64), torch.eye(d_out, dtype=torch.float64))
    fitted = whitened_projections(tiny_model, ident, cfg)
    plain = Projector(modules, cfg.model_copy(update={"precondition": "none"}))
    for n in modules:
        assert torch.allclose(fitted.matrices[n][0], plain.random(n, "in"), atol=1e-9)
        assert torch.allclose(fitted.matrices[n][1], plain.random(n, "out"), atol=1e-9)


def test_fitted_projections_round_trip_and_digest(tiny_model):
    cfg = LoggingConfig(proj_dim_in=4, proj_dim_out=3)
    fitted = fit_kfac_projections(tiny_model, _Tok(), examples(SEQS), cfg)
    back = FittedProjections.from_bytes(fitted.to_bytes())
    assert back.digest() == fitted.digest() and back.meta == fitted.meta
    other = fit_kfac_projections(tiny_model, _Tok(), examples(SEQS[:2]), cfg)
    assert other.digest() != fitted.digest()
    assert fitted.meta["examples"] == len(SEQS) and fitted.meta["tokens"] == sum(map(len, SEQS))


def test_errors_name_the_fix(tiny_model):
    with pytest.raises(ValueError, match="precondition='none'"):
        GradientCollector(tiny_model, LoggingConfig())  # kfac without fitted projections
    fitted = fit_kfac_projections(tiny_model, _Tok(), examples(SEQS), LoggingConfig(proj_dim_in=4, proj_dim_out=3))
    with pytest.raises(ValueError, match="refit them"):
        GradientCollector(tiny_model, LoggingConfig(proj_dim_in=5, proj_dim_out=3), fitted)
    with pytest.raises(ValueError, match="refit them"):
        GradientCollector(tiny_model, LoggingConfig(modules=["*"], exclude_modules=[]), fitted)
    modules = select_modules(tiny_model, ["*"], ["lm_head"])
    with pytest.raises(ValueError, match="max_factor_dim=4 .*precondition='none'"):
        pre_projection_dims(modules, LoggingConfig(max_factor_dim=4, wide_layers="refuse"))
    with pytest.raises(ValueError, match="max_factor_dim"):
        CovarianceCollector(tiny_model, LoggingConfig(max_factor_dim=4, wide_layers="refuse"))
    with pytest.raises(ValueError, match="projection='identity' keeps every dimension"):
        CovarianceCollector(tiny_model, LoggingConfig(max_factor_dim=4, projection="identity"))
    with pytest.raises(ValueError, match="corpus is empty"):
        fit_kfac_factors(tiny_model, _Tok(), [], LoggingConfig())
    with pytest.raises(ValueError, match="set it to 'kfac'"):
        fit_kfac_projections(tiny_model, _Tok(), examples(SEQS), LoggingConfig(precondition="none"))


# Lowered below some widths of both tiny models (GPT-2: 16, c_attn out 48, mlp 64; Llama: 16, k/v out 8, mlp 24).
LIMIT = 20
WIDE = dict(proj_dim_in=4, proj_dim_out=3, precondition_damping=0.05, max_factor_dim=LIMIT, wide_layer_dim=12)


def wide_sides(model, cfg):
    modules = select_modules(model, cfg.modules, cfg.exclude_modules)
    return {n: {s: d for s, d in zip(("in", "out"), layer_dims(m)) if d > LIMIT} for n, m in modules.items()}


def test_wide_sides_are_pre_projected_and_recorded(tiny_model):
    cfg = LoggingConfig(**WIDE)
    expected = {n: {s: 12 for s in sides} for n, sides in wide_sides(tiny_model, cfg).items() if sides}
    assert expected and len(expected) < len(wide_sides(tiny_model, cfg))  # some layers wide, some not
    fitted = fit_kfac_projections(tiny_model, _Tok(), examples(SEQS), cfg)
    assert fitted.pre_projected == expected and fitted.meta["pre_projected"] == expected
    assert fitted.meta["max_factor_dim"] == LIMIT
    # Still one k×d matrix per side: the Projector takes them as it takes exactly whitened ones.
    projector = Projector(select_modules(tiny_model, cfg.modules, cfg.exclude_modules), cfg, fitted)
    for name, (d_in, d_out) in projector.dims.items():
        assert fitted.matrices[name][0].shape == (min(4, d_in), d_in)
        assert fitted.matrices[name][1].shape == (min(3, d_out), d_out)
    back = FittedProjections.from_bytes(fitted.to_bytes())
    assert back.pre_projected == expected and back.digest() == fitted.digest()
    # m is capped at max_factor_dim and never below the side's projection size
    modules = select_modules(tiny_model, cfg.modules, cfg.exclude_modules)
    assert all(
        m == LIMIT
        for s in pre_projection_dims(modules, cfg.model_copy(update={"wide_layer_dim": 99})).values()
        for m in s.values()
    )
    assert all(
        m == 4
        for s in pre_projection_dims(modules, cfg.model_copy(update={"wide_layer_dim": 1, "proj_dim_out": 4})).values()
        for m in s.values()
    )


def test_collector_never_forms_a_wide_factor(tiny_model):
    cfg = LoggingConfig(**WIDE)
    with CovarianceCollector(tiny_model, cfg) as collector:
        collector.update(*collate(SEQS, 0))
        factors = collector.factors()
    for name, sides in wide_sides(tiny_model, cfg).items():
        d_in, d_out = layer_dims(collector.modules[name])
        a, s = factors[name]
        assert a.shape == ((12, 12) if "in" in sides else (d_in, d_in)), name
        assert s.shape == ((12, 12) if "out" in sides else (d_out, d_out)), name
        assert collector.a_sums[name].shape == a.shape and collector.s_sums[name].shape == s.shape
    exact, _ = explicit_factors(tiny_model, cfg, SEQS)  # d×d factors handed to a config that pre-projects
    with pytest.raises(ValueError, match="fit the factors with the same logging config"):
        whitened_projections(tiny_model, exact, cfg)


def test_pre_projected_side_equals_explicit_formula(tiny_model):
    """P = R (R0 A R0ᵀ + λI)^-½ R0 from the explicit d×d factor (fp64), and the hooks log P_out G P_inᵀ."""
    cfg = LoggingConfig(**WIDE)
    fitted = fit_kfac_projections(tiny_model, _Tok(), examples(SEQS), cfg)
    factors, _ = explicit_factors(tiny_model, cfg, SEQS)
    checked = 0
    for name, sides in wide_sides(tiny_model, cfg).items():
        for i, (side, k) in enumerate((("in", 4), ("out", 3))):
            if side not in sides:
                continue
            a = factors[name][i]  # d×d, explicit
            r0 = draw_pre_projection("gaussian", 12, a.shape[0], cfg.seed, name, side)
            r = draw_projection("orthogonal", k, 12, cfg.seed, name, side)
            sketched = r0 @ a @ r0.T
            lam = 0.05 * torch.linalg.eigvalsh(sketched).mean()
            evals, evecs = torch.linalg.eigh(sketched + lam * torch.eye(12, dtype=torch.float64))
            expected = r @ (evecs * evals.rsqrt()) @ evecs.T @ r0
            assert torch.allclose(fitted.matrices[name][i], expected, atol=1e-8), (name, side)
            checked += 1
    assert checked >= 2
    got = hook_gradients(tiny_model, cfg, SEQS, batch_size=3, fitted=fitted)
    assert torch.allclose(got, reference_gradients(tiny_model, cfg, SEQS, fitted=fitted), atol=1e-9, rtol=1e-7)


def test_sides_within_the_limit_are_unchanged(tiny_model):
    base = LoggingConfig(**{**WIDE, "max_factor_dim": 8192})
    before = fit_kfac_projections(tiny_model, _Tok(), examples(SEQS), base)
    after = fit_kfac_projections(tiny_model, _Tok(), examples(SEQS), LoggingConfig(**WIDE))
    assert before.pre_projected == {}
    unchanged = 0
    for name, sides in wide_sides(tiny_model, base).items():
        for i, side in enumerate(("in", "out")):
            if side not in sides:
                assert torch.equal(after.matrices[name][i], before.matrices[name][i]), (name, side)
                unchanged += 1
    assert unchanged > 0
    # Projections stored before wide layers were supported (no new meta keys) load and log as they did.
    old = FittedProjections(before.matrices, {k: before.meta[k] for k in ("kind", "damping", "examples", "tokens")})
    back = FittedProjections.from_bytes(old.to_bytes())
    assert back.pre_projected == {} and back.digest() == before.digest()
    assert torch.equal(
        hook_gradients(tiny_model, base, SEQS, fitted=back), hook_gradients(tiny_model, base, SEQS, fitted=before)
    )


def test_new_fields_leave_old_configs_unchanged():
    """At their defaults the wide-layer fields stay out of dumps: old configs keep their fingerprints."""
    cfg = LoggingConfig()
    assert "wide_layers" not in cfg.model_dump() and "wide_layer_dim" not in cfg.model_dump()
    assert LoggingConfig.model_validate(cfg.model_dump(mode="json")).fingerprint() == cfg.fingerprint()
    refuse = LoggingConfig(wide_layers="refuse", wide_layer_dim=64)
    assert refuse.model_dump()["wide_layers"] == "refuse" and refuse.fingerprint() != cfg.fingerprint()
    assert LoggingConfig.model_validate(refuse.model_dump(mode="json")) == refuse


@pytest.mark.parametrize("make", [make_tiny_gpt2, make_tiny_llama])
def test_attribute_with_pre_projected_layers(make):
    """index → query in memory with the limit lowered: fitted, recorded, logged and scored in every mode."""
    texts = ["the cat sat on the mat.", "a fox ran past the dog.", "the dog sat in the sun.", "rain on the town."]
    tokenizer = train_tokenizer(texts * 4, vocab_size=300)
    model = make(torch.float64, vocab=len(tokenizer), seed=1)
    cfg = LoggingConfig(**WIDE, batch_size=2)
    modes = ["dot", "influence", "relatif", "cosine"]
    queries = [{"id": "cat", "prompt": "the cat sat on", "completion": " the mat"}]
    result = attribute(model, tokenizer, texts, queries, logging=cfg, modes=modes, top_k=2, max_length=8)
    assert result.fitted is not None and result.fitted.pre_projected == {
        n: {s: 12 for s in sides} for n, sides in wide_sides(model, cfg).items() if sides
    }
    refit = fit_kfac_projections(model, tokenizer, result.examples, cfg)
    assert refit.digest() == result.fitted.digest()
    for mode in modes:
        assert result.scores[mode].shape == (1, len(result.examples)) and torch.isfinite(result.scores[mode]).all()
    # The stored vectors are those of the hooks under the fitted projections, as for exactly whitened layers.
    ids = [e.input_ids for e in result.examples]
    assert (
        relative_error(
            hook_gradients(model, cfg, ids, fitted=result.fitted),
            reference_gradients(model, cfg, ids, fitted=result.fitted),
        )
        < 1e-9
    )


def test_sample_examples_spreads_over_the_corpus():
    ex = examples([[1, 2]] * 10)
    assert sample_indices(10, 4) == [0, 2, 5, 7]
    assert [e.example_id for e in sample_examples(ex, 4)] == [0, 2, 5, 7]
    assert sample_examples(ex, 20) == ex


@pytest.mark.gpu
def test_cuda_projections_match_cpu(tiny_model):
    cfg = LoggingConfig(proj_dim_in=4, proj_dim_out=3)
    cpu = fit_kfac_projections(tiny_model, _Tok(), examples(SEQS), cfg)
    gpu = fit_kfac_projections(tiny_model.to("cuda"), _Tok(), examples(SEQS), cfg)
    tol = cross_device_tolerance(tiny_model)
    for name, (p_in, p_out) in cpu.matrices.items():
        assert gpu.matrices[name][0].device.type == "cpu"
        assert relative_error(gpu.matrices[name][0], p_in) < 10 * tol  # an inverse square root amplifies round-off
        assert relative_error(gpu.matrices[name][1], p_out) < 10 * tol
    grads = hook_gradients(tiny_model, cfg, SEQS, fitted=gpu)
    assert grads.device.type == "cuda"
    assert relative_error(grads.cpu(), hook_gradients(tiny_model.cpu(), cfg, SEQS, fitted=cpu)) < 10 * tol


def test_pca_whitening_is_top_eigenvectors_whitened():
    """pca_whitening = (Λ_k + λ)^-½ U_kᵀ: rows are the top-k eigenvectors, largest first, and P M Pᵀ is diagonal
    with entries λ_i / (λ_i + λ) — the whitened factor restricted to its top-k directions."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(7, 20, dtype=torch.float64, generator=g)
    cov = m @ m.T
    p = pca_whitening(cov, 0.1, 3)
    evals, evecs = torch.linalg.eigh(cov)
    lam = 0.1 * evals.mean()
    top = evecs[:, [6, 5, 4]]
    expected = (top * (evals[[6, 5, 4]] + lam).rsqrt()).T
    signs = torch.sign((p * expected).sum(1))  # an eigenvector's sign is free
    assert torch.allclose(p * signs[:, None], expected, atol=1e-10)
    assert torch.allclose(p @ cov @ p.T, torch.diag(evals[[6, 5, 4]] / (evals[[6, 5, 4]] + lam)), atol=1e-10)
    # All k = d rows: the full whitening, up to a rotation (same inner products).
    full = pca_whitening(cov, 0.1, 7)
    assert torch.allclose(full.T @ full, inverse_sqrt(cov, 0.1) @ inverse_sqrt(cov, 0.1), atol=1e-10)


@pytest.mark.parametrize("wide", [False, True])
def test_pca_basis_projections_equal_explicit(tiny_model, wide):
    """basis='pca': each side is the top-k eigenvectors of its explicit fp64 KFAC factor (of R0 x for a side wider
    than max_factor_dim, then times R0), whitened; the hooks log P_out G P_inᵀ with them, as autograd does."""
    extra = WIDE if wide else dict(proj_dim_in=4, proj_dim_out=3, precondition_damping=0.05)
    cfg = LoggingConfig(**extra, basis="pca", projection="orthogonal")
    fitted = fit_kfac_projections(tiny_model, _Tok(), examples(SEQS), cfg)
    assert fitted.meta["basis"] == "pca"
    factors, _ = explicit_factors(tiny_model, cfg, SEQS)
    pre = wide_sides(tiny_model, cfg) if wide else {}
    checked = 0
    for name, sides in factors.items():
        for i, (side, k) in enumerate((("in", 4), ("out", 3))):
            a, r0 = sides[i], None
            if side in pre.get(name, {}):
                r0 = draw_pre_projection("orthogonal", 12, a.shape[0], cfg.seed, name, side)
                a = r0 @ a @ r0.T
            k = min(k, a.shape[0])
            evals, evecs = torch.linalg.eigh(a)
            lam = 0.05 * evals.clamp(min=0).mean()
            order = evals.argsort(descending=True)[:k]
            expected = (evecs[:, order] * (evals[order] + lam).rsqrt()).T
            if r0 is not None:
                expected = expected @ r0
                checked += 1
            got = fitted.matrices[name][i]
            signs = torch.sign((got * expected).sum(1))
            assert torch.allclose(got * signs[:, None], expected, atol=1e-8), (name, side)
    assert checked >= (2 if wide else 0)
    got = hook_gradients(tiny_model, cfg, SEQS, batch_size=3, fitted=fitted)
    assert torch.allclose(got, reference_gradients(tiny_model, cfg, SEQS, fitted=fitted), atol=1e-9, rtol=1e-7)


def test_pca_basis_config():
    """The PCA basis needs KFAC factors and a Kronecker projection; at its default it stays out of dumps."""
    assert "basis" not in LoggingConfig().model_dump()
    assert LoggingConfig(basis="pca").fingerprint() != LoggingConfig().fingerprint()
    for bad in (dict(precondition="none"), dict(projection="identity")):
        with pytest.raises(ValueError, match="basis='pca'"):
            LoggingConfig(basis="pca", **bad)
