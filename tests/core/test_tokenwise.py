"""Token-wise attribution: per-position and per-token gradients sum to the logged ones, and every mode's token
splits sum to the Scorer's score, on tiny GPT-2 and Llama in float64."""

import pytest
import torch
from gradcheck import SEQS, _Tok, cross_device_tolerance, examples, hook_gradients, relative_error

from dataworth.attribution.curvature import fit_fisher
from dataworth.attribution.gradients import query_gradients
from dataworth.attribution.kfac import fit_kfac_projections
from dataworth.attribution.scoring import Scorer
from dataworth.attribution.tokenwise import (
    PositionCollector,
    check_tokenwise,
    completion_token_gradients,
    example_position_gradients,
    token_splits,
)
from dataworth.config import ALL_SCORE_MODES, CurvatureConfig, LoggingConfig, ScoreConfig
from dataworth.errors import ConfigError
from dataworth.queries import EncodedQuery

QUERIES = [
    EncodedQuery("a", "", [5, 9, 2], [13, 4, 7], "", False),
    EncodedQuery("b", "", [8], [21, 3], "", False),
    EncodedQuery("c", "", [1, 2, 3, 4], [6], "", False),
]


def _config(precondition: str, **kw) -> LoggingConfig:
    return LoggingConfig(projection="gaussian", proj_dim_in=4, proj_dim_out=3, precondition=precondition, **kw)


def _rtol(model) -> float:
    """Llama computes its RMSNorm and rotary embedding in float32 whatever the model's dtype: passes over
    differently padded batches agree to float32 rounding there, to float64's on GPT-2."""
    return 1e-6 if model.config.model_type == "llama" else 1e-10


def _fitted(model, cfg):
    return fit_kfac_projections(model, _Tok(), examples(SEQS), cfg) if cfg.precondition == "kfac" else None


@pytest.mark.parametrize("precondition", ["none", "kfac"])
def test_position_gradients_sum_to_logged(tiny_model, precondition):
    cfg = _config(precondition)
    fitted = _fitted(tiny_model, cfg)
    logged = hook_gradients(tiny_model, cfg, SEQS, fitted=fitted)
    per_pos = example_position_gradients(tiny_model, SEQS, cfg, 0, batch_size=3, fitted=fitted)
    for seq, p, g in zip(SEQS, per_pos, logged):
        assert p.shape == (len(seq), g.shape[0])
        assert relative_error(p.sum(0), g) < _rtol(tiny_model)
    # every position but the last carries a term; the last predicts nothing and feeds no later loss
    for p in per_pos:
        assert bool((p[:-1].abs().sum(1) > 0).all()) and bool((p[-1] == 0).all())


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_completion_token_gradients_sum_to_query_gradient(tiny_model, reduction):
    cfg = _config("none", loss_reduction=reduction)
    whole = query_gradients(tiny_model, QUERIES, cfg, 0, batch_size=2)
    tokens = completion_token_gradients(tiny_model, QUERIES, cfg, 0, batch_size=4)
    for q, t, g in zip(QUERIES, tokens, whole):
        assert t.shape == (len(q.completion_ids), g.shape[0])
        assert relative_error(t.sum(0), g) < _rtol(tiny_model)
    # each row is its own token's gradient: the first token's alone, from a query with only that token
    first = EncodedQuery("a0", "", QUERIES[0].prompt_ids, QUERIES[0].completion_ids[:1], "", False)
    alone = query_gradients(tiny_model, [first], cfg, 0, batch_size=1)[0]
    scale = len(QUERIES[0].completion_ids) if reduction == "mean" else 1
    assert relative_error(tokens[0][0] * scale, alone) < _rtol(tiny_model)


@pytest.mark.parametrize("curvature", ["raw", "ekfac", "identity"])
@pytest.mark.parametrize("precondition", ["none", "kfac"])
def test_token_splits_sum_to_scorer_scores(tiny_model, precondition, curvature):
    cfg = _config(precondition)
    fitted = _fitted(tiny_model, cfg)
    train = hook_gradients(tiny_model, cfg, SEQS, fitted=fitted)
    curv = fit_fisher(_layout(tiny_model, cfg, fitted), CurvatureConfig(kind=curvature), lambda: [train])
    q_grads = query_gradients(tiny_model, QUERIES, cfg, 0, batch_size=3, fitted=fitted)
    modes = list(ALL_SCORE_MODES)
    scorer = Scorer(q_grads, curv, modes, top_k=len(SEQS), full_matrix_size=len(SEQS), dtype=torch.float64)
    scorer.update(torch.arange(len(SEQS)), train)
    norms = {i: float(n) for i, n in enumerate(curv.whitened_norms(train))}
    pairs = [(q, m, e) for q in range(len(QUERIES)) for m in modes for e in (0, 2, 3)]
    splits = token_splits(
        tiny_model,
        cfg,
        fitted,
        QUERIES,
        q_grads,
        curv,
        pairs,
        dict(enumerate(SEQS)),
        0,
        batch_size=3,
        stored=dict(enumerate(train)),
        norms=norms,
    )
    assert [(s.query, s.mode, s.example_id) for s in splits] == pairs
    for s in splits:
        want = float(scorer.full[s.mode][s.query, s.example_id])
        tol = 100 * _rtol(tiny_model) * max(1.0, abs(want))
        assert abs(s.score - want) <= tol, (s.mode, s.score, want)
        assert s.query_scores.shape == (len(QUERIES[s.query].completion_ids),)
        assert s.train_scores.shape == (len(SEQS[s.example_id]),)
        assert abs(float(s.query_scores.sum()) - want) <= tol, (s.mode, "query side")
        assert abs(float(s.train_scores.sum()) - want) <= tol, (s.mode, "train side")
        assert s.query_tokens == QUERIES[s.query].completion_ids and s.train_tokens == SEQS[s.example_id]
    # the split is not trivial: tokens carry different shares
    assert any(float(s.train_scores.std()) > 1e-6 * max(1.0, abs(s.score)) for s in splits)


def _layout(model, cfg, fitted):
    with PositionCollector(model, cfg, fitted) as c:
        return c.layout


def test_refusals_name_the_fix():
    with pytest.raises(ConfigError, match="--projection"):
        check_tokenwise(LoggingConfig(projection="rapidgrad", precondition="none"), ["dot"])
    with pytest.raises(ConfigError, match="--checkpoint-indexes"):
        check_tokenwise(LoggingConfig(), ["dot"], checkpoints=1)
    with pytest.raises(ConfigError, match="add one"):
        check_tokenwise(LoggingConfig(), ["bm25", "hybrid-rrf-dot"])
    assert check_tokenwise(LoggingConfig(), ["bm25", "relatif", "hybrid-rrf-dot", "dot"]) == ["relatif", "dot"]


def test_tokenwise_top_keeps_old_score_run_ids():
    assert "tokenwise_top" not in ScoreConfig().model_dump()
    assert ScoreConfig(tokenwise_top=2).model_dump()["tokenwise_top"] == 2
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        ScoreConfig(tokenwise_top=-1)


@pytest.mark.gpu
def test_cuda_token_splits_match_cpu(tiny_model):
    cfg = _config("none")
    seqs = {i: s for i, s in enumerate(SEQS)}
    q_grads = query_gradients(tiny_model, QUERIES, cfg, 0, batch_size=3)
    curv = fit_fisher(
        _layout(tiny_model, cfg, None), CurvatureConfig(), lambda: [hook_gradients(tiny_model, cfg, SEQS)]
    )
    pairs = [(q, m, e) for q in range(len(QUERIES)) for m in ALL_SCORE_MODES for e in (0, 2)]
    cpu = token_splits(tiny_model, cfg, None, QUERIES, q_grads, curv, pairs, seqs, 0, batch_size=3)
    gpu = token_splits(tiny_model.to("cuda"), cfg, None, QUERIES, q_grads, curv, pairs, seqs, 0, batch_size=3)
    tol = 10 * cross_device_tolerance(tiny_model)
    for a, b in zip(cpu, gpu):
        assert b.query_scores.device.type == "cpu" and b.train_scores.device.type == "cpu"
        assert relative_error(b.query_scores, a.query_scores) < tol
        assert relative_error(b.train_scores, a.train_scores) < tol
