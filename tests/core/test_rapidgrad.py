"""RapidGrad (projection='rapidgrad') against explicit computations in fp64: the hooks' folded gradients against
autograd per-example gradients normalized, permuted, signed and folded by hand; the seeded draw; inner products
preserved in expectation; the curvature of its 1×K blocks; the optimizer-state correction; the errors; and the
in-memory pipeline."""

import pytest
import torch
from gradcheck import (
    SEQS,
    _Tok,
    cross_device_tolerance,
    examples,
    hook_gradients,
    plain,
    reference_gradients,
    relative_error,
)
from tiny import make_tiny_gpt2

from dataworth import attribute
from dataworth.attribution.curvature import fit_fisher
from dataworth.attribution.hooks import GradientCollector
from dataworth.attribution.kfac import fit_projections
from dataworth.attribution.optimizer_state import optimizer_scales
from dataworth.attribution.projection import (
    FittedProjections,
    Projector,
    describe_layout,
    draw_rapidgrad,
    layer_dims,
    select_modules,
)
from dataworth.attribution.rapidgrad import RapidGrad
from dataworth.benchmarks.tiny_model import train_tokenizer
from dataworth.config import CurvatureConfig, GenerationConfig, LoggingConfig
from dataworth.data import collate
from dataworth.errors import ConfigError, IndexMismatchError
from dataworth.losses import mean_token_loss

# Sequences of 3+ tokens: in a 2-token sequence the one predicting position attends only to itself, so layer 0's
# query and key gradients are zero up to round-off, and normalizing them turns that round-off into a unit vector
# that differs with the batch (what any layer-wise normalization does to a gradient that is zero in exact math).
SEQS3 = [s for s in SEQS if len(s) >= 3]


def rapid(**kwargs) -> LoggingConfig:
    return plain(projection="rapidgrad", **kwargs)


def explicit_fold(g: torch.Tensor, perm: torch.Tensor, signs: torch.Tensor, k: int, normalize: bool) -> torch.Tensor:
    """[B, D] → [B, K] step by step: divide by the norm, permute, sign, zero-pad to a multiple of K, cut, sum."""
    if normalize:
        norms = g.norm(dim=1, keepdim=True)
        g = torch.where(norms > 0, g / norms, g)
    v = g[:, perm.long()] * signs.to(g.dtype)
    v = torch.cat([v, torch.zeros(g.shape[0], (-g.shape[1]) % k, dtype=g.dtype)], dim=1)
    return torch.stack([v[:, s : s + k] for s in range(0, v.shape[1], k)]).sum(0)


def explicit_rapidgrad(model, cfg, seqs, scales=None):
    """Autograd per-example G (d_out × d_in) of every tracked module, times outer(s_out, s_in) when `scales` are
    given, folded by `explicit_fold` with each module's drawn permutation and signs."""
    modules = select_modules(model, cfg.modules, cfg.exclude_modules)
    full = reference_gradients(model, cfg.model_copy(update={"projection": "identity"}), seqs)
    rows, offset = [], 0
    for name, module in modules.items():
        d_in, d_out = layer_dims(module)
        g = full[:, offset : offset + d_out * d_in]
        offset += d_out * d_in
        if scales is not None:
            s_in, s_out = scales[name]
            g = (g.reshape(-1, d_out, d_in) * torch.outer(s_out, s_in)).reshape(len(seqs), -1)
        k = min(cfg.rapidgrad_dim or min(cfg.proj_dim_out, d_out) * min(cfg.proj_dim_in, d_in), d_out * d_in)
        comp = draw_rapidgrad(d_out, d_in, k, cfg.seed, name)
        rows.append(explicit_fold(g, comp.perm, comp.signs, k, cfg.rapidgrad_normalize))
    return torch.cat(rows, dim=1)


@pytest.mark.parametrize(
    "options",
    [{}, {"rapidgrad_normalize": False}, {"rapidgrad_dim": 10}, {"rapidgrad_dim": 100000}],
    ids=["default", "unnormalized", "k10", "k-capped"],
)
def test_hooks_equal_explicit_rapidgrad(tiny_model, options):
    # 4×3: K = 12 by default, which does not divide every layer's d_out·d_in (the zero padding is exercised)
    cfg = rapid(proj_dim_in=4, proj_dim_out=3, seed=7, **options)
    expected = explicit_rapidgrad(tiny_model, cfg, SEQS3)
    got = hook_gradients(tiny_model, cfg, SEQS3)
    assert got.dtype == torch.float64 and got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-12, rtol=1e-9)
    assert expected.abs().sum() > 0
    for bs in (1, 2):  # padding within a batch leaks into no gradient
        assert torch.allclose(hook_gradients(tiny_model, cfg, SEQS3, batch_size=bs), expected, atol=1e-12, rtol=1e-9)
    # an example without a label has a zero gradient, which stays zero (not 0/0)
    lone = hook_gradients(tiny_model, cfg, [[5], [1, 2, 3]])
    assert torch.count_nonzero(lone[0]) == 0 and torch.count_nonzero(lone[1]) > 0


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny_model):
    """The permutation and signs are drawn on the CPU and moved: a CUDA run folds the same way."""
    cfg = rapid(proj_dim_in=4, proj_dim_out=3)
    cpu = hook_gradients(tiny_model, cfg, SEQS3)
    gpu = hook_gradients(tiny_model.to("cuda"), cfg, SEQS3)
    assert gpu.device.type == "cuda"
    assert relative_error(gpu.cpu(), cpu) < cross_device_tolerance(tiny_model)


def test_normalized_blocks_have_unit_norm_before_folding(tiny_model):
    """K = d_out·d_in: no folding, only a signed permutation, so each block keeps G/‖G‖ exactly (norm 1)."""
    cfg = rapid(rapidgrad_dim=10**6)
    got = hook_gradients(tiny_model, cfg, SEQS[:1])
    for b, sl in GradientCollector(tiny_model, cfg).layout.slices():
        assert float(got[0, sl].norm()) == pytest.approx(1.0, abs=1e-12), b.name


def test_shared_module_is_normalized_whole(tiny_model):
    """A module called twice per forward: its gradient is the sum over both calls, normalized and folded once."""
    layers = tiny_model.transformer.h if hasattr(tiny_model, "transformer") else tiny_model.model.layers
    attr = "c_fc" if hasattr(layers[0].mlp, "c_fc") else "up_proj"
    setattr(layers[1].mlp, attr, getattr(layers[0].mlp, attr))  # one module, two calls (listed once)
    cfg = rapid(proj_dim_in=4, proj_dim_out=3)
    expected = explicit_rapidgrad(tiny_model, cfg, SEQS3)
    for bs in (None, 1):
        got = hook_gradients(tiny_model, cfg, SEQS3, batch_size=bs)
        assert torch.allclose(got, expected, atol=1e-12, rtol=1e-9)


def test_layout_stores_the_same_bytes_as_logra(tiny_model):
    """Default K = LoGra's block size of each layer; the block is one row of K; compression d_out·d_in / K."""
    gaussian, full = describe_layout(tiny_model, plain(proj_dim_in=4, proj_dim_out=3))
    layout, full_r = describe_layout(tiny_model, rapid(proj_dim_in=4, proj_dim_out=3))
    assert full == full_r and layout.dim == gaussian.dim
    modules = select_modules(tiny_model, ["*"], LoggingConfig().exclude_modules)
    for b, g in zip(layout.blocks, gaussian.blocks):
        assert (b.name, b.k_out, b.k_in, b.offset) == (g.name, 1, g.size, g.offset)
        d_in, d_out = layer_dims(modules[b.name])
        assert draw_rapidgrad(d_out, d_in, b.size, 0, b.name).ratio == d_out * d_in / b.size
    fixed, _ = describe_layout(tiny_model, rapid(rapidgrad_dim=20))
    assert {b.size for b in fixed.blocks} == {20}


def test_same_seed_redraws_the_same_compression(tiny_model):
    a = draw_rapidgrad(6, 5, 7, 0, "layer.a")
    again = draw_rapidgrad(6, 5, 7, 0, "layer.a")
    assert torch.equal(a.perm, again.perm) and torch.equal(a.signs, again.signs)
    assert sorted(a.perm.tolist()) == list(range(30)) and set(a.signs.tolist()) == {-1, 1}
    assert not torch.equal(a.perm, draw_rapidgrad(6, 5, 7, 0, "layer.b").perm)
    assert not torch.equal(a.perm, draw_rapidgrad(6, 5, 7, 1, "layer.a").perm)
    cfg = rapid(proj_dim_in=4, proj_dim_out=3)
    assert torch.equal(hook_gradients(tiny_model, cfg, SEQS3), hook_gradients(tiny_model, cfg, SEQS3))


def test_folding_preserves_inner_products_in_expectation():
    """E⟨c(u), c(v)⟩ = ⟨u, v⟩ over the draw (a count sketch): 400 draws, fixed seeds, a 5-standard-error bound."""
    gen = torch.Generator().manual_seed(0)
    d, k, draws = 600, 24, 400
    u = torch.randn(1, d, generator=gen, dtype=torch.float64)
    v = 0.6 * u + torch.randn(1, d, generator=gen, dtype=torch.float64)
    dots, sq = [], []
    for i in range(draws):
        comp = draw_rapidgrad(20, 30, k, 0, f"draw{i}", normalize=False)
        cu, cv = comp(u), comp(v)
        dots.append(float(cu @ cv.T))
        sq.append(float(cu.norm() ** 2))
    dots, sq = torch.tensor(dots, dtype=torch.float64), torch.tensor(sq, dtype=torch.float64)
    for sample, want in ((dots, float(u @ v.T)), (sq, float(u.norm() ** 2))):
        assert abs(float(sample.mean()) - want) < 5 * float(sample.std()) / draws**0.5, (float(sample.mean()), want)
    # one draw is only an estimate: the spread is real (the bound above is not vacuous)
    assert float(dots.std()) > 0.05 * abs(float(u @ v.T))
    # normalized: ⟨c(u), c(v)⟩ estimates the cosine
    comp = draw_rapidgrad(20, 30, d, 0, "whole")  # K = D: a signed permutation, exact
    assert float(comp(u) @ comp(v).T) == pytest.approx(float(torch.cosine_similarity(u, v)), abs=1e-12)


def test_ekfac_on_rapidgrad_blocks_is_the_raw_fisher(tiny_model):
    cfg = rapid(proj_dim_in=2, proj_dim_out=2)
    grads = hook_gradients(tiny_model, cfg, SEQS * 3)
    layout = GradientCollector(tiny_model, cfg).layout
    fits = {}
    for kind in ("raw", "ekfac"):
        fits[kind] = fit_fisher(layout, CurvatureConfig(kind=kind, damping_factor=0.2), lambda: [grads])
    assert torch.allclose(fits["ekfac"].matrix(-1.0), fits["raw"].matrix(-1.0), atol=1e-8, rtol=1e-8)


def test_optimizer_state_correction_then_rapidgrad(tiny_model, tmp_path):
    """With logging.optimizer_state the folded gradient is that of diag(s_out) G diag(s_in)."""
    opt = torch.optim.AdamW(tiny_model.named_parameters(), lr=1e-2, betas=(0.9, 0.98), eps=1e-8)
    tiny_model.train()
    for _ in range(2):
        ids, att, labels = collate(SEQS, 0)
        mean_token_loss(tiny_model(input_ids=ids, attention_mask=att).logits, labels).backward()
        opt.step()
        opt.zero_grad()
    tiny_model.eval()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    cfg = rapid(proj_dim_in=4, proj_dim_out=3, optimizer_state=str(tmp_path / "optimizer.pt"))
    fitted = fit_projections(tiny_model, _Tok(), examples(SEQS), cfg)
    assert fitted.meta["kind"] == "optimizer"
    got = hook_gradients(tiny_model, cfg, SEQS3, batch_size=2, fitted=fitted)
    scales, _ = optimizer_scales(tiny_model, cfg)
    expected = explicit_rapidgrad(tiny_model, cfg, SEQS3, scales)
    assert torch.allclose(got, expected, atol=1e-12, rtol=1e-8)
    uncorrected = hook_gradients(tiny_model, cfg.model_copy(update={"optimizer_state": None}), SEQS3)
    assert torch.cosine_similarity(got.flatten(), uncorrected.flatten(), dim=0) < 0.999
    with pytest.raises(ConfigError, match="optimizer_state needs projections fitted"):
        GradientCollector(tiny_model, cfg)


def test_errors(tiny_model):
    # KFAC whitening acts on a Kronecker side: refused by the config itself (precondition='kfac' by default), and,
    # for a config built without validation, when the collector (or the layout) is built, before any pass
    with pytest.raises(ValueError, match="no input or output side left to whiten"):
        LoggingConfig(projection="rapidgrad")
    cfg = LoggingConfig.model_construct(projection="rapidgrad")
    with pytest.raises(ConfigError, match=r"precondition='none'") as err:
        GradientCollector(tiny_model, cfg)
    assert "precondition" in err.value.fix
    with pytest.raises(ConfigError, match="no input or output side left to whiten"):
        describe_layout(tiny_model, cfg)
    # fitted matrices other than a diagonal scaling (here a gaussian Kronecker projection's) are refused
    modules = select_modules(tiny_model, ["*"], LoggingConfig().exclude_modules)
    plain_cfg = plain(proj_dim_in=4, proj_dim_out=3)
    kron = Projector(modules, plain_cfg)
    wrong = FittedProjections({n: (kron.random(n, "in"), kron.random(n, "out")) for n in modules}, {"kind": "kfac"})
    with pytest.raises(IndexMismatchError, match="not a diagonal"):
        Projector(modules, rapid(proj_dim_in=4, proj_dim_out=3), wrong)
    with pytest.raises(ValueError, match="rapidgrad_dim"):
        rapid(rapidgrad_dim=0)
    with pytest.raises(ValueError, match="k must be in"):
        RapidGrad.draw(10, 11, torch.Generator())
    with pytest.raises(ValueError, match="drawn for 10"):
        RapidGrad.draw(10, 3, torch.Generator())(torch.zeros(2, 9))
    # the new fields stay out of dumps at their defaults: existing configs keep their fingerprints
    dumped = LoggingConfig().model_dump()
    assert "rapidgrad_dim" not in dumped and "rapidgrad_normalize" not in dumped
    assert "rapidgrad_normalize" in rapid(rapidgrad_normalize=False).model_dump()


TEXTS = [
    "the cat sat on the mat and looked at the dog.",
    "a quick brown fox jumps over the lazy dog.",
    "the dog ran to the park with the cat.",
    "rain fell on the town all day long.",
]


@pytest.mark.parametrize("kind", ["raw", "ekfac"])
def test_attribute_with_rapidgrad(kind):
    tokenizer = train_tokenizer(TEXTS * 4, vocab_size=300)
    model = make_tiny_gpt2(torch.float64, vocab=len(tokenizer), seed=1)
    logging = rapid(proj_dim_in=4, proj_dim_out=3, batch_size=3)
    modes = ["dot", "influence", "relatif", "cosine", "trackstar"]
    queries = [{"id": "cat", "prompt": "the cat sat on", "completion": " the mat"}, "the dog ran"]
    result = attribute(
        model,
        tokenizer,
        TEXTS,
        queries,
        logging=logging,
        curvature=CurvatureConfig(kind=kind),
        modes=modes,
        top_k=3,
        max_length=12,
        generation=GenerationConfig(max_new_tokens=3),
    )
    assert result.fitted is None and all(b.k_out == 1 for b in result.layout.blocks)
    assert result.query_gradients.shape == (2, result.layout.dim)
    for mode in modes:
        assert result.scores[mode].shape == (2, len(result.examples))
        assert torch.isfinite(result.scores[mode]).all()
    # dot is the inner product of the stored (float32) folded gradients
    stored = explicit_rapidgrad(model, logging, [e.input_ids for e in result.examples]).float().double()
    assert torch.allclose(result.scores["dot"], result.query_gradients @ stored.T, rtol=1e-5, atol=1e-6)
