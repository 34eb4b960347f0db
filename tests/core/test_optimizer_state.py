"""TrackStar's optimizer-state correction against explicit computations (fp64): the factored 1/√v scales from a
real AdamW state, the corrected hook gradients against autograd ones scaled by hand, KFAC factors of the
corrected gradient, the numbering of unnamed states, and the errors."""

import math

import pytest
import torch
from gradcheck import SEQS, _Tok, examples, explicit_factors, hook_gradients, reference_gradients
from tiny import make_tiny_gpt2
from transformers.pytorch_utils import Conv1D

from dataworth import attribute
from dataworth.attribution.kfac import fit_projections, inverse_sqrt
from dataworth.attribution.optimizer_state import (
    factored_error,
    factored_scales,
    load_second_moments,
    optimizer_scales,
)
from dataworth.attribution.projection import draw_projection, select_modules
from dataworth.benchmarks.tiny_model import train_tokenizer
from dataworth.config import CurvatureConfig, GenerationConfig, LoggingConfig, QuerySpec
from dataworth.data import Documents, chunk_documents, collate
from dataworth.errors import ConfigError, ModelError
from dataworth.evaluation.optimizer_fidelity import correction_fidelity
from dataworth.losses import mean_token_loss
from dataworth.queries import encode_queries

EPS = 1e-8


def train_adamw(model, steps=3, named=True, groups=None, lr=1e-2):
    """A few real AdamW steps on SEQS; returns the optimizer (the model's weights move)."""
    if groups is not None:
        params = groups
    else:
        params = model.named_parameters() if named else model.parameters()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=EPS)
    model.train()
    for _ in range(steps):
        ids, att, labels = collate(SEQS, 0)
        mean_token_loss(model(input_ids=ids, attention_mask=att).logits, labels).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


@pytest.fixture
def trained(tiny_model, tmp_path):
    opt = train_adamw(tiny_model)
    path = tmp_path / "optimizer.pt"
    torch.save(opt.state_dict(), path)
    return tiny_model, opt, str(path)


def explicit_scales(model, opt, name):
    """(s_in, s_out) of a module by hand: bias-corrected v as (d_out, d_in), Adafactor's row/column sums."""
    module = dict(model.named_modules())[name]
    state = opt.state[module.weight]
    beta2 = opt.param_groups[0]["betas"][1]
    v = state["exp_avg_sq"].double() / (1 - beta2 ** int(state["step"]))
    if isinstance(module, Conv1D):
        v = v.T
    a = torch.sqrt(v.sum(1) / math.sqrt(v.sum()))
    b = torch.sqrt(v.sum(0) / math.sqrt(v.sum()))
    return 1 / (b + math.sqrt(EPS)), 1 / (a + math.sqrt(EPS)), v


def test_factored_form_is_exact_for_rank_one_moments():
    r, c = torch.rand(5, dtype=torch.float64) + 0.1, torch.rand(4, dtype=torch.float64) + 0.1
    v = torch.outer(r, c)
    s_in, s_out = factored_scales(v, 0.0)
    assert torch.allclose(torch.outer(s_out, s_in), v.rsqrt(), rtol=1e-12)
    assert factored_error(v, 0.0) < 1e-12
    noisy = v * (1 + torch.rand(5, 4, dtype=torch.float64))
    assert factored_error(noisy, 0.0) > 1e-3
    # no update yet: every weight scaled by 1/ε, as Adam scales a zero second moment
    s_in, s_out = factored_scales(torch.zeros(3, 2, dtype=torch.float64), 1e-8)
    assert torch.allclose(torch.outer(s_out, s_in), torch.full((3, 2), 1e8, dtype=torch.float64))


def test_scales_from_a_real_adamw_state(trained):
    model, opt, path = trained
    cfg = LoggingConfig(precondition="none", optimizer_state=path)
    scales, meta = optimizer_scales(model, cfg)
    assert meta["step"] == 3 and meta["eps"] == EPS and meta["numbering"] == "the state's param_names"
    assert set(scales) == set(select_modules(model, cfg.modules, cfg.exclude_modules))
    for name, (s_in, s_out) in scales.items():
        e_in, e_out, v = explicit_scales(model, opt, name)
        assert torch.allclose(s_in, e_in, rtol=1e-10) and torch.allclose(s_out, e_out, rtol=1e-10), name
        assert 0 < meta["factored_error"][name] == pytest.approx(factored_error(v, EPS))


@pytest.mark.parametrize("projection", ["identity", "gaussian"])
def test_corrected_gradients_equal_explicit(trained, projection):
    """The hooks log P_out (D_out G D_in) P_inᵀ, D = diag of the factored scales, G from autograd."""
    model, opt, path = trained
    cfg = LoggingConfig(precondition="none", optimizer_state=path, projection=projection, proj_dim_in=4, proj_dim_out=3)
    fitted = fit_projections(model, _Tok(), examples(SEQS), cfg)
    assert fitted.meta["kind"] == "optimizer"
    got = hook_gradients(model, cfg, SEQS, batch_size=3, fitted=fitted)
    # Explicit: autograd G of each module, scaled elementwise by s_out s_inᵀ, then randomly projected.
    plain = LoggingConfig(precondition="none", projection="identity")
    raw = reference_gradients(model, plain, SEQS)
    rows, offset = [], 0
    for name in select_modules(model, cfg.modules, cfg.exclude_modules):
        s_in, s_out, v = explicit_scales(model, opt, name)
        d_out, d_in = v.shape
        g = raw[:, offset : offset + d_out * d_in].reshape(-1, d_out, d_in) * torch.outer(s_out, s_in)
        offset += d_out * d_in
        p_out = draw_projection(projection, min(3, d_out), d_out, cfg.seed, name, "out")
        p_in = draw_projection(projection, min(4, d_in), d_in, cfg.seed, name, "in")
        if p_out is not None:
            g = p_out @ g @ p_in.T
        rows.append(g.reshape(len(SEQS), -1))
    expected = torch.cat(rows, dim=1)
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-12 * float(expected.abs().max()))
    # The correction changes the gradients: it is not a no-op.
    uncorrected = hook_gradients(model, cfg.model_copy(update={"optimizer_state": None}), SEQS)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), uncorrected.flatten(), dim=0)
    assert cos < 0.999


def test_kfac_factors_of_the_corrected_gradient(trained):
    """precondition='kfac' with the correction: P = R (D A D + λ)^-½ D, A the uncorrected factor."""
    model, opt, path = trained
    cfg = LoggingConfig(optimizer_state=path, proj_dim_in=4, proj_dim_out=3, precondition_damping=0.05)
    fitted = fit_projections(model, _Tok(), examples(SEQS), cfg)
    assert fitted.meta["kind"] == "kfac" and fitted.meta["optimizer"]["step"] == 3
    factors, _ = explicit_factors(model, cfg, SEQS)
    for name, (a, s) in factors.items():
        s_in, s_out, _ = explicit_scales(model, opt, name)
        for i, (factor, d, k, side) in enumerate(((a, s_in, 4, "in"), (s, s_out, 3, "out"))):
            r = draw_projection("orthogonal", min(k, factor.shape[0]), factor.shape[0], cfg.seed, name, side)
            scaled = d[:, None] * factor * d[None, :]
            expected = r @ inverse_sqrt(scaled, 0.05) * d[None, :]
            assert torch.allclose(fitted.matrices[name][i], expected, rtol=1e-7, atol=1e-9), (name, side)


def test_attribute_scores_the_corrected_gradients(tmp_path):
    """End to end in memory: identity projection and curvature, dot = ⟨D_out G_q D_in, D_out G_i D_in⟩ of
    autograd gradients, the query side corrected exactly as the stored side."""
    texts = ["the cat sat on the mat.", "a fox ran past the dog.", "the dog sat in the sun.", "rain on the town."]
    tokenizer = train_tokenizer(texts * 4, vocab_size=300)
    model = make_tiny_gpt2(torch.float64, vocab=len(tokenizer), seed=1)
    opt = train_adamw(model, steps=2)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    logging = LoggingConfig(precondition="none", optimizer_state=str(tmp_path), projection="identity")
    queries = [{"id": "cat", "prompt": "the cat sat on", "completion": " the mat"}]
    result = attribute(
        model, tokenizer, texts, queries, logging=logging, curvature=CurvatureConfig(kind="identity"), modes=["dot"]
    )
    assert result.fitted.meta["kind"] == "optimizer"
    raw = reference_gradients(
        model, LoggingConfig(precondition="none", projection="identity"), [e.input_ids for e in result.examples]
    )
    scale = torch.cat(
        [
            torch.outer(explicit_scales(model, opt, name)[1], explicit_scales(model, opt, name)[0]).reshape(-1)
            for name in select_modules(model, logging.modules, logging.exclude_modules)
        ]
    )
    train = raw * scale
    q_raw = result.query_gradients
    assert q_raw.shape[1] == train.shape[1]
    expected = q_raw.double() @ train.T  # scored in float32, from float32 stored rows
    assert torch.allclose(result.scores["dot"], expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    # and the query's gradient is corrected too: its uncorrected gradient scores differently
    uncorrected = attribute(
        model,
        tokenizer,
        texts,
        queries,
        logging=logging.model_copy(update={"optimizer_state": None}),
        curvature=CurvatureConfig(kind="identity"),
        modes=["dot"],
    )
    assert not torch.allclose(uncorrected.query_gradients * scale, uncorrected.query_gradients)
    assert torch.allclose(result.query_gradients, uncorrected.query_gradients * scale, rtol=1e-8, atol=1e-14)


def test_unnamed_states_are_numbered_by_shape(tiny_model, tmp_path):
    opt = train_adamw(tiny_model, named=False)
    path = tmp_path / "o.pt"
    torch.save(opt.state_dict(), path)
    state = load_second_moments(str(path), tiny_model)
    assert state.meta["numbering"] == "parameters in model order"
    weight = dict(tiny_model.named_parameters())
    for name, v in state.moments.items():
        p = weight[name]
        st = opt.state[p]
        assert torch.allclose(v, st["exp_avg_sq"].double() / (1 - 0.98 ** int(st["step"])))


def test_trainer_style_groups_are_numbered(tiny_model, tmp_path):
    """A Trainer's two groups: weights with decay first, then biases and norm weights."""
    named = list(tiny_model.named_parameters())
    modules = dict(tiny_model.named_modules())

    def no_decay(n):
        owner = modules[n.rsplit(".", 1)[0]] if "." in n else tiny_model
        return n.endswith("bias") or "norm" in type(owner).__name__.lower()

    groups = [
        {"params": [p for n, p in named if not no_decay(n)], "weight_decay": 0.01},
        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
    ]
    opt = train_adamw(tiny_model, groups=groups)
    path = tmp_path / "checkpoint"
    path.mkdir()
    torch.save(opt.state_dict(), path / "optimizer.pt")
    state = load_second_moments(str(path), tiny_model)  # a checkpoint directory
    assert state.meta["numbering"] == "Trainer's decay / no-decay groups"
    by_id = {id(p): n for n, p in named}
    for p, st in opt.state.items():
        assert torch.allclose(state.moments[by_id[id(p)]], st["exp_avg_sq"].double() / (1 - 0.98 ** int(st["step"])))


def test_errors_name_the_fix(tiny_model, tmp_path):
    cfg = lambda p: LoggingConfig(precondition="none", optimizer_state=str(p))  # noqa: E731
    with pytest.raises(ConfigError, match="does not exist"):
        optimizer_scales(tiny_model, cfg(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="without optimizer.pt"):
        optimizer_scales(tiny_model, cfg(tmp_path))
    sgd = torch.optim.SGD(tiny_model.parameters(), lr=0.1, momentum=0.9)
    ids, att, labels = collate(SEQS, 0)
    mean_token_loss(tiny_model(input_ids=ids, attention_mask=att).logits, labels).backward()
    sgd.step()
    torch.save(sgd.state_dict(), tmp_path / "sgd.pt")
    with pytest.raises(ConfigError, match="exp_avg_sq"):
        optimizer_scales(tiny_model, cfg(tmp_path / "sgd.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="cannot read"):
        optimizer_scales(tiny_model, cfg(tmp_path / "junk.pt"))
    # a state saved for another model: shapes match no numbering
    other = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 7))
    opt = torch.optim.AdamW(other.parameters())
    other(torch.randn(4, 3)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ModelError, match="another model"):
        optimizer_scales(tiny_model, cfg(tmp_path / "other.pt"))
    # a projector without the fitted projections says what to do
    from dataworth.attribution.hooks import GradientCollector

    with pytest.raises(ConfigError, match="optimizer_state needs projections fitted"):
        GradientCollector(tiny_model, cfg(tmp_path / "o.pt"))


def test_optimizer_state_is_left_out_of_old_dumps():
    assert "optimizer_state" not in LoggingConfig().model_dump()
    assert LoggingConfig(optimizer_state="x.pt").model_dump()["optimizer_state"] == "x.pt"
    assert LoggingConfig(optimizer_state="x.pt").fitted and not LoggingConfig(precondition="none").fitted


def test_correction_fidelity_is_perfect_for_rank_one_moments(tmp_path):
    """With every second moment of rank one the factored form is exact, so the rankings agree fully; with a real
    AdamW state the measure is a correlation, not a constant."""
    texts = ["the cat sat on the mat.", "a fox ran past the dog.", "the dog sat in the sun.", "rain on the town."]
    tokenizer = train_tokenizer(texts * 4, vocab_size=300)
    model = make_tiny_gpt2(torch.float64, vocab=len(tokenizer), seed=2)
    names = [n for n, _ in model.named_parameters()]
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i, (_n, p) in enumerate(model.named_parameters()):
        v = torch.rand(p.shape[0], generator=gen, dtype=torch.float64) + 0.1
        if p.dim() == 2:
            v = torch.outer(v, torch.rand(p.shape[1], generator=gen, dtype=torch.float64) + 0.1)
        state[i] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": v}
    groups = [{"params": list(range(len(names))), "param_names": names, "betas": (0.9, 0.98), "eps": 1e-8}]
    torch.save({"state": state, "param_groups": groups}, tmp_path / "rank1.pt")
    examples = chunk_documents(Documents(texts, [str(i) for i in range(4)], [""] * 4), tokenizer, 16, True)
    queries = encode_queries(
        model, tokenizer, [QuerySpec(id="q", prompt="the cat sat", completion=" on the mat")], GenerationConfig(), 64
    )
    perfect = correction_fidelity(model, tokenizer, examples, queries, str(tmp_path / "rank1.pt"), k=2)
    assert perfect.spearman == pytest.approx(1.0) and perfect.topk_overlap == 1.0
    assert max(perfect.layer_error.values()) < 1e-3  # only ε keeps it from 0
    opt = train_adamw(model, steps=2)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    real = correction_fidelity(model, tokenizer, examples, queries, str(tmp_path), k=2)
    assert -1.0 <= real.spearman <= 1.0 and min(real.layer_error.values()) > 0
    assert set(real.as_dict()) >= {"spearman", "topk_overlap", "uncorrected_spearman", "mean_layer_error"}
