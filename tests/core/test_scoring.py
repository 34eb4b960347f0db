"""Fisher, damping and every score mode against explicit matrix formulas (fp64)."""

import numpy as np
import pytest
import torch

from dataworth.attribution.curvature import Curvature, FisherAccumulator, fit_fisher
from dataworth.attribution.hybrid import rerank, score_candidates
from dataworth.attribution.projection import Block, Layout
from dataworth.attribution.scoring import Scorer, TopK, checkpoint_sum, prepare_queries, score_batch
from dataworth.config import ALL_SCORE_MODES, DEFAULT_SCORE_MODES, HYBRID_MODES, CurvatureConfig, ScoreConfig
from dataworth.errors import ConfigError, DataError

LAYOUT = Layout((Block("a", 2, 3, 0), Block("b", 2, 2, 6)))


def explicit_fisher(G, factor):
    """Dense block-diagonal F + λI with λ = factor × mean eigenvalue per block."""
    D = G.shape[1]
    M = torch.zeros(D, D, dtype=torch.float64)
    for b, sl in LAYOUT.slices():
        Fb = G[:, sl].T @ G[:, sl] / G.shape[0]
        lam = factor * torch.linalg.eigvalsh(Fb).mean()
        M[sl, sl] = Fb + lam * torch.eye(b.size, dtype=torch.float64)
    return M


def explicit_ekfac(G, factor, layout=LAYOUT):
    """Dense block-diagonal EKFAC + λI from the per-example k_out × k_in gradient matrices: eigenvectors of
    E[G Gᵀ] and E[Gᵀ G], eigenvalues E[(Q_Sᵀ G Q_A)²], λ = factor × trace(F_b) / b (the raw Fisher's)."""
    D = G.shape[1]
    M = torch.zeros(D, D, dtype=torch.float64)
    for b, sl in layout.slices():
        mats = G[:, sl].reshape(-1, b.k_out, b.k_in)  # the stored row-major layout of each example's block
        q_s = torch.linalg.eigh((mats @ mats.transpose(1, 2)).mean(0)).eigenvectors
        q_a = torch.linalg.eigh((mats.transpose(1, 2) @ mats).mean(0)).eigenvectors
        lam = (q_s.T @ mats @ q_a).square().mean(0).reshape(-1)
        basis = torch.kron(q_s, q_a)
        damping = factor * torch.trace(G[:, sl].T @ G[:, sl] / G.shape[0]) / b.size
        M[sl, sl] = basis @ torch.diag(lam + damping) @ basis.T
    return M


def fit(G, factor=0.1, batch=7, kind="raw", layout=LAYOUT):
    return fit_fisher(layout, CurvatureConfig(kind=kind, damping_factor=factor), lambda: G.split(batch))


@pytest.fixture
def data():
    torch.manual_seed(0)
    G = torch.randn(40, LAYOUT.dim, dtype=torch.float64)
    Q = torch.randn(5, LAYOUT.dim, dtype=torch.float64)
    return G, Q


def test_fisher_and_damping_match_explicit(data):
    G, _ = data
    curv = fit(G, 0.3)
    M = explicit_fisher(G, 0.3)
    assert torch.allclose(curv.matrix(1.0), M, atol=1e-10)
    assert torch.allclose(curv.matrix(-1.0), torch.linalg.inv(M), atol=1e-10)
    evals, evecs = torch.linalg.eigh(M)
    assert torch.allclose(curv.matrix(-0.5), evecs @ torch.diag(evals.rsqrt()) @ evecs.T, atol=1e-10)
    # batching of the accumulation does not matter
    assert torch.allclose(fit(G, 0.3, batch=40).matrix(-1.0), curv.matrix(-1.0), atol=1e-12)
    # serialization round trip and cheap re-damping
    again = Curvature.from_bytes(curv.to_bytes())
    assert torch.allclose(again.matrix(-1.0), curv.matrix(-1.0), atol=1e-12)
    assert torch.allclose(curv.with_damping(1.0).matrix(1.0), explicit_fisher(G, 1.0), atol=1e-10)


def explicit_scores(G, Q, Minv, mode):
    if mode == "dot":
        return Q @ G.T
    if mode == "influence":
        return Q @ Minv @ G.T
    if mode == "relatif":
        denom = torch.sqrt(torch.einsum("nd,de,ne->n", G, Minv, G))
        return (Q @ Minv @ G.T) / denom
    if mode == "cosine":
        num = Q @ Minv @ G.T
        qn = torch.sqrt(torch.einsum("nd,de,ne->n", Q, Minv, Q))
        gn = torch.sqrt(torch.einsum("nd,de,ne->n", G, Minv, G))
        return num / qn[:, None] / gn[None, :]
    raise AssertionError(mode)


def explicit_norms(G, Minv):
    """sqrt(g_i^T (F+λI)^-1 g_i) with the dense inverse."""
    return torch.sqrt(torch.einsum("nd,de,ne->n", G, Minv, G))


def curvature_and_inverse(G, kind, factor=0.2):
    if kind == "identity":
        return Curvature.identity(LAYOUT), torch.eye(LAYOUT.dim, dtype=torch.float64)
    if kind == "ekfac":
        return fit(G, factor, kind="ekfac"), torch.linalg.inv(explicit_ekfac(G, factor))
    return fit(G, factor), torch.linalg.inv(explicit_fisher(G, factor))


def test_ekfac_matches_explicit(data):
    G, _ = data
    curv = fit(G, 0.3, kind="ekfac")
    assert curv.kind == "ekfac"
    M = explicit_ekfac(G, 0.3)
    assert torch.allclose(curv.matrix(1.0), M, atol=1e-10)
    assert torch.allclose(curv.matrix(-1.0), torch.linalg.inv(M), atol=1e-10)
    assert not torch.allclose(M, explicit_fisher(G, 0.3), atol=1e-3)  # a 2×3 block is not a Kronecker product
    # λ is the raw Fisher's: the corrected eigenvalues keep its trace
    assert curv.damping == pytest.approx(fit(G, 0.3).damping, rel=1e-12)
    again = Curvature.from_bytes(curv.to_bytes())
    assert again.kind == "ekfac" and torch.allclose(again.matrix(-1.0), curv.matrix(-1.0), atol=1e-12)
    redamped = curv.with_damping(1.0)
    assert redamped.kind == "ekfac" and torch.allclose(redamped.matrix(1.0), explicit_ekfac(G, 1.0), atol=1e-10)


def test_ekfac_is_fitted_in_two_passes_from_its_factors(data):
    """No block's Fisher is formed: two passes (the factors, then the eigenvalues in their basis) give the explicit
    EKFAC and every mode's explicit scores, sides up to max_block_dim are allowed whatever the block's size, and a
    skipped or partial second pass is a clear error."""
    G, Q = data
    cfg = CurvatureConfig(kind="ekfac", damping_factor=0.3, max_block_dim=3)  # blocks of 6 and 4 > 3: still fitted
    passes = []

    def batches():
        passes.append(1)
        return G.split(7)

    curv = fit_fisher(LAYOUT, cfg, batches)
    assert len(passes) == 2 and all(len(block) == 3 for block in curv.blocks.values())  # (Λ, Q_S, Q_A)
    assert torch.allclose(curv.matrix(1.0), explicit_ekfac(G, 0.3), atol=1e-10)
    Minv = torch.linalg.inv(explicit_ekfac(G, 0.3))
    scorer = Scorer(Q, curv, list(DEFAULT_SCORE_MODES), top_k=3, full_matrix_size=G.shape[0], dtype=torch.float64)
    scorer.update(torch.arange(G.shape[0]), G)
    for mode in DEFAULT_SCORE_MODES:
        assert torch.allclose(scorer.full[mode], explicit_scores(G, Q, Minv, mode), atol=1e-9), mode

    acc = FisherAccumulator(LAYOUT, cfg)
    acc.update(G)
    assert acc.needs_second_pass
    with pytest.raises(DataError, match="needs a second pass.*fit_fisher"):
        acc.finalize()
    acc.begin_correction()
    acc.update(G[:10])
    with pytest.raises(DataError, match="40 examples; 10 seen again"):
        acc.finalize()
    with pytest.raises(ConfigError, match="Use curvature kind ekfac"):
        FisherAccumulator(LAYOUT, CurvatureConfig(kind="raw", max_block_dim=4))
    with pytest.raises(ConfigError, match="EKFAC factor of side 3"):
        FisherAccumulator(LAYOUT, CurvatureConfig(kind="ekfac", max_block_dim=2))


def test_a_dense_ekfac_artifact_still_reads(data):
    """Indexes fitted before the factored form stored each ekfac block as (Λ, Q_S ⊗ Q_A): they score the same."""
    G, Q = data
    curv = fit(G, 0.3, kind="ekfac")
    old = {n: (e, torch.kron(q_s, q_a)) for n, (e, q_s, q_a) in curv.blocks.items()}
    dense = Curvature.from_bytes(Curvature.from_eigen(LAYOUT, old, curv.count, 0.3, "ekfac").to_bytes())
    assert torch.allclose(dense.matrix(-0.5), curv.matrix(-0.5), atol=1e-10)
    assert torch.allclose(dense.whitened_norms(G), curv.whitened_norms(G), atol=1e-10)
    assert torch.allclose(dense.mixed(Q, 0.4).matrix(-1.0), curv.mixed(Q, 0.4).matrix(-1.0), atol=1e-10)


def test_ekfac_of_a_one_row_block_is_the_raw_fisher():
    """With k_out = 1, S is a scalar and Q_A diagonalizes F itself: EKFAC is the raw Fisher exactly."""
    layout = Layout((Block("row", 1, 5, 0),))
    torch.manual_seed(1)
    G = torch.randn(30, 5, dtype=torch.float64)
    ekfac, raw = fit(G, 0.2, kind="ekfac", layout=layout), fit(G, 0.2, layout=layout)
    assert torch.allclose(ekfac.matrix(-1.0), raw.matrix(-1.0), atol=1e-10)


@pytest.mark.parametrize("kind", ["raw", "ekfac", "identity"])
def test_whitened_norms_match_explicit(data, kind):
    G, Q = data
    curv, Minv = curvature_and_inverse(G, kind)
    assert torch.allclose(curv.whitened_norms(G), explicit_norms(G, Minv), atol=1e-10)
    assert torch.allclose(curv.whitened_norms(G), curv.apply(G, -0.5).norm(dim=1), atol=1e-10)
    assert torch.allclose(curv.whitened_norms(Q.float()), explicit_norms(Q, Minv).float(), rtol=1e-4)


@pytest.mark.parametrize("kind", ["raw", "ekfac", "identity"])
def test_stacked_matmul_is_every_mode(data, kind):
    """One matmul of at most two vectors per query, then per-column (1/n_i) and per-row (1/n_q) scales."""
    G, Q = data
    curv, Minv = curvature_and_inverse(G, kind)
    modes = ["dot", "influence", "relatif", "cosine"]
    prepared = prepare_queries(Q, curv, modes)
    assert prepared.stacked.shape == (2 * Q.shape[0], LAYOUT.dim)
    assert torch.allclose(prepared.stacked[prepared.plain], Q, atol=1e-12)
    assert torch.allclose(prepared.stacked[prepared.inverse], Q @ Minv, atol=1e-10)
    assert torch.allclose(prepared.query_scale, 1 / explicit_norms(Q, Minv), atol=1e-10)
    scores = score_batch(prepared, G, explicit_norms(G, Minv))
    assert list(scores) == modes
    for m in modes:
        assert torch.allclose(scores[m], explicit_scores(G, Q, Minv, m), atol=1e-9), m
    assert prepare_queries(Q, curv, ["influence", "cosine"]).stacked.shape == Q.shape  # no g_q rows without dot
    with pytest.raises(ValueError, match="norms"):
        score_batch(prepared, G)


@pytest.mark.parametrize("norms", ["stored", "per-batch"])
@pytest.mark.parametrize("kind", ["raw", "ekfac", "identity"])
@pytest.mark.parametrize("mode", ["dot", "influence", "relatif", "cosine"])
def test_score_modes_match_explicit(data, kind, mode, norms):
    G, Q = data
    curv, Minv = curvature_and_inverse(G, kind)
    expected = explicit_scores(G, Q, Minv, mode)
    ids = torch.arange(G.shape[0])
    stored = curv.whitened_norms(G) if norms == "stored" else None
    scorer = Scorer(Q, curv, [mode], top_k=5, full_matrix_size=G.shape[0], dtype=torch.float64, norms=stored)
    for s in range(0, 40, 9):
        scorer.update(ids[s : s + 9], G[s : s + 9])
    assert torch.allclose(scorer.full[mode], expected, atol=1e-9)
    top = torch.topk(expected, 5, dim=1)
    assert torch.equal(scorer.topk[mode].ids, top.indices)
    assert torch.allclose(scorer.topk[mode].scores, top.values, atol=1e-9)
    assert scorer.pairs == 40 * 5


@pytest.mark.parametrize("with_norms", [True, False])
def test_query_batching_and_train_batching_invariance(data, with_norms):
    G, Q = data
    curv = fit(G)
    ids = torch.arange(G.shape[0])
    modes = ["dot", "influence", "relatif", "cosine"]
    norms = curv.whitened_norms(G) if with_norms else None

    def run(q, batch):
        sc = Scorer(q, curv, modes, top_k=7, dtype=torch.float64, norms=norms)
        perm = torch.randperm(G.shape[0], generator=torch.Generator().manual_seed(batch))
        for s in range(0, 40, batch):  # any read order, any batch size
            sc.update(ids[perm[s : s + batch]], G[perm[s : s + batch]])
        return sc

    whole = run(Q, 40)
    for batch in (1, 6):
        parts = [run(Q[i : i + 2], batch) for i in range(0, 5, 2)]
        for m in modes:
            assert torch.equal(torch.cat([p.topk[m].ids for p in parts]), whole.topk[m].ids)
            assert torch.allclose(torch.cat([p.topk[m].scores for p in parts]), whole.topk[m].scores, atol=1e-10)


def test_topk_breaks_ties_by_example_id():
    t = TopK(1, 3)
    t.update(torch.tensor([[1.0, 2.0]]), torch.tensor([9, 4]))
    t.update(torch.tensor([[2.0, 2.0, 0.5]]), torch.tensor([1, 7, 3]))
    assert t.ids.tolist() == [[1, 4, 7]]


def full_sort_topk(scores, ids, k):
    """The reference: sort every (score, id) by score descending, then id ascending."""
    by_id = torch.argsort(ids)
    s, i = scores[:, by_id], ids[by_id].expand(scores.shape[0], -1)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, order), i.gather(1, order)


@pytest.mark.parametrize("k", [1, 4, 30])
def test_topk_equals_a_full_sort_with_the_tie_rule(k):
    torch.manual_seed(k)
    scores = torch.randint(0, 5, (6, 200)).to(torch.float32)  # many ties, also across every cut
    scores[1] = 0.0  # a row of nothing but ties
    scores[2] = torch.randn(200)
    ids = torch.randperm(1000)[:200]
    ref_scores, ref_ids = full_sort_topk(scores, ids, k)
    for batch in (1, 7, 64, 200):
        perm = torch.randperm(200, generator=torch.Generator().manual_seed(batch))
        t = TopK(6, k)
        for s in range(0, 200, batch):
            t.update(scores[:, perm[s : s + batch]], ids[perm[s : s + batch]])
        assert torch.equal(t.ids, ref_ids) and torch.equal(t.scores, ref_scores.double()), batch


def old_whitening_scores(Q, G, curv, mode):
    """The scores as computed before the stored norms: every stored batch whitened again per query run."""
    whitened = curv.apply(G, -0.5)
    norm = whitened.norm(dim=1)
    inv = curv.apply(Q, -1.0)
    if mode == "relatif":
        raw = inv @ G.T
        return torch.where(norm > 1e-30, raw / norm.clamp(min=1e-30), torch.zeros_like(raw))

    def unit(x):
        n = x.norm(dim=1, keepdim=True)
        return torch.where(n > 1e-30, x / n.clamp(min=1e-30), torch.zeros_like(x))

    return unit(curv.apply(Q, -0.5)) @ unit(whitened).T


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_norm_path_equals_old_whitening_path(data, dtype, tol):
    G, Q = data
    G = G.clone()
    G[5] = 0
    curv = fit(G)
    sc = Scorer(Q, curv, ["relatif", "cosine"], top_k=3, full_matrix_size=40, dtype=dtype, norms=curv.whitened_norms(G))
    for s in range(0, 40, 16):
        sc.update(torch.arange(s, min(s + 16, 40)), G[s : s + 16].to(dtype))
    for m in ("relatif", "cosine"):
        old = old_whitening_scores(Q.to(dtype), G.to(dtype), curv, m).double()
        assert torch.allclose(sc.full[m], old, atol=tol, rtol=tol), m


@pytest.mark.parametrize("with_norms", [True, False])
def test_zero_gradient_rows_score_zero(data, with_norms):
    G, Q = data
    G = G.clone()
    G[3] = 0
    Q = Q.clone()
    Q[1] = 0
    curv = fit(G)
    norms = curv.whitened_norms(G) if with_norms else None
    sc = Scorer(Q, curv, ["relatif", "cosine"], top_k=3, full_matrix_size=40, dtype=torch.float64, norms=norms)
    sc.update(torch.arange(40), G)
    for m in ("relatif", "cosine"):
        assert torch.isfinite(sc.full[m]).all() and (sc.full[m][:, 3] == 0).all() and (sc.full[m][1] == 0).all()
        assert sc.topk[m].ids[1].tolist() == [0, 1, 2]  # a zero query: all ties, smallest ids first


def test_oversized_block_is_refused():
    with pytest.raises(ValueError, match="max_block_dim"):
        FisherAccumulator(LAYOUT, CurvatureConfig(kind="raw", max_block_dim=5))


@pytest.mark.parametrize("kind", ["raw", "ekfac", "identity"])
def test_relatif_and_cosine_rank_alike_and_identity_influence_is_dot(data, kind):
    """What the README says of the modes: cosine = relatif ÷ ‖(F+λI)^-½ g_q‖ (the same order within a query,
    not across queries), and with identity curvature influence is dot."""
    G, Q = data
    curv, Minv = curvature_and_inverse(G, kind)
    scorer = Scorer(Q, curv, ["dot", "influence", "relatif", "cosine"], top_k=10, full_matrix_size=40)
    scorer.update(torch.arange(40), G.float())
    relatif, cosine = scorer.full["relatif"], scorer.full["cosine"]
    query_norms = explicit_norms(Q, Minv)
    assert torch.allclose(cosine * query_norms[:, None], relatif, rtol=1e-4, atol=1e-6)
    assert torch.equal(scorer.topk["relatif"].ids, scorer.topk["cosine"].ids)
    if kind == "identity":
        assert torch.allclose(scorer.full["influence"], scorer.full["dot"], rtol=1e-6, atol=1e-6)
    else:
        assert not torch.allclose(scorer.full["influence"], scorer.full["dot"], rtol=1e-2)


# trackstar: cosine under TrackStar's task-specific curvature, against dense explicit matrices (fp64).


@pytest.fixture
def shared_queries():
    torch.manual_seed(1)
    G = torch.randn(40, LAYOUT.dim, dtype=torch.float64)
    # queries that share a direction, as the queries of one template do
    shared = torch.randn(1, LAYOUT.dim, dtype=torch.float64)
    Q = torch.randn(5, LAYOUT.dim, dtype=torch.float64) * 0.3 + 2.0 * shared
    return G, Q


def explicit_task(G, Q, w, kind, factor=0.2):
    """Dense T + λI: per block (1-w) F + w (tr F / tr F_q) F_q, λ the train Fisher's (F raw or EKFAC)."""
    dense = explicit_fisher(G, factor) if kind == "raw" else explicit_ekfac(G, factor)
    M = torch.zeros_like(dense)
    for b, sl in LAYOUT.slices():
        lam = factor * torch.trace(G[:, sl].T @ G[:, sl] / G.shape[0]) / b.size
        F = dense[sl, sl] - lam * torch.eye(b.size, dtype=torch.float64)
        Fq = Q[:, sl].T @ Q[:, sl] / Q.shape[0]
        T = (1 - w) * F + w * torch.trace(F) / torch.trace(Fq) * Fq
        M[sl, sl] = T + lam * torch.eye(b.size, dtype=torch.float64)
    return M


@pytest.mark.parametrize("kind", ["raw", "ekfac"])
@pytest.mark.parametrize("w", [0.3, 0.8])
def test_trackstar_is_cosine_under_the_task_curvature(shared_queries, kind, w):
    G, Q = shared_queries
    curv, _ = curvature_and_inverse(G, kind)
    task = curv.mixed(Q, w)
    Tinv = torch.linalg.inv(explicit_task(G, Q, w, kind))
    assert torch.allclose(task.matrix(-1.0), Tinv, atol=1e-9)
    # the mix keeps the trace, so λ is the train Fisher's
    assert task.damping == curv.damping
    Tdamped = explicit_task(G, Q, w, kind)
    for b, sl in LAYOUT.slices():
        trace = torch.trace(Tdamped[sl, sl]) - b.size * curv.damping[b.name]
        assert float(trace) == pytest.approx(float(curv.blocks[b.name][0].sum()), rel=1e-10)
    # only the inverse is applied (all trackstar needs), by Woodbury: its norms are those of the explicit inverse
    assert torch.allclose(task.whitened_norms(G), torch.sqrt(torch.einsum("nd,de,ne->n", G, Tinv, G)), atol=1e-9)
    with pytest.raises(ConfigError, match="power -1 only"):
        task.apply(Q, -0.5)
    expected = explicit_scores(G, Q, Tinv, "cosine")
    scorer = Scorer(Q, curv, ["trackstar", "cosine"], top_k=5, full_matrix_size=40, dtype=torch.float64, task_mix=w)
    ids = torch.arange(40)
    for s in range(0, 40, 9):
        scorer.update(ids[s : s + 9], G[s : s + 9])
    assert torch.allclose(scorer.full["trackstar"], expected, atol=1e-9)
    top = torch.topk(expected, 5, dim=1)
    assert torch.equal(scorer.topk["trackstar"].ids, top.indices)
    # and it is not cosine under the train Fisher: the shared direction was discounted
    assert not torch.allclose(scorer.full["trackstar"], scorer.full["cosine"], atol=1e-3)


def test_no_mix_is_cosine_and_identity_is_plain_cosine(shared_queries):
    G, Q = shared_queries
    curv, Minv = curvature_and_inverse(G, "raw")
    prepared = prepare_queries(Q, curv, ["cosine", "trackstar"], task_mix=0.0)
    scores = score_batch(prepared, G, curv.whitened_norms(G))
    assert torch.allclose(scores["trackstar"], scores["cosine"], atol=1e-12)
    ident, eye = curvature_and_inverse(G, "identity")
    assert ident.mixed(Q, 0.5) is ident
    scores = score_batch(prepare_queries(Q, ident, ["trackstar"]), G)
    assert torch.allclose(scores["trackstar"], explicit_scores(G, Q, eye, "cosine"), atol=1e-12)


def test_stacked_rows_and_query_parts(shared_queries):
    """trackstar adds one row per query to the stacked matmul; a part of the queries, given the whole set's T,
    scores as the whole set does."""
    G, Q = shared_queries
    curv, _ = curvature_and_inverse(G, "raw")
    whole = prepare_queries(Q, curv, ["dot", "influence", "trackstar"])
    assert whole.stacked.shape == (3 * 5, LAYOUT.dim)
    full = score_batch(whole, G)["trackstar"]
    part = prepare_queries(Q[1:3], curv, ["trackstar"], task=whole.task_curvature)
    assert torch.allclose(score_batch(part, G)["trackstar"], full[1:3], atol=1e-12)
    taken = whole.take([4, 0])
    assert torch.allclose(score_batch(taken, G)["trackstar"], full[[4, 0]], atol=1e-12)
    # fitted on the part alone, T differs: the curvature is the query set's
    alone = prepare_queries(Q[1:3], curv, ["trackstar"])
    assert not torch.allclose(score_batch(alone, G)["trackstar"], full[1:3], atol=1e-6)


def test_rerank_scores_candidates_as_the_full_pass(shared_queries):
    G, Q = shared_queries
    curv, _ = curvature_and_inverse(G, "ekfac")
    task = curv.mixed(Q, 0.5)
    full = score_batch(prepare_queries(Q, curv, ["trackstar"], task=task), G)["trackstar"]
    rng = np.random.default_rng(0)
    candidates = [np.sort(rng.choice(40, 8, replace=False)) for _ in range(5)]
    ids = np.unique(np.concatenate(candidates))
    got = score_candidates(Q, curv, "trackstar", [np.searchsorted(ids, c) for c in candidates], G[ids], task=task)
    for q, c in enumerate(candidates):
        assert np.allclose(got[q], full[q, c].numpy(), atol=1e-10)
    ranked = rerank(Q[:2], curv, "trackstar", candidates[:2], ids, G[ids], task=task)
    for q in range(2):
        assert set(ranked[q][0]) == set(candidates[q])
        assert np.all(np.diff(ranked[q][1]) <= 0)


def test_config_and_errors(shared_queries):
    G, Q = shared_queries
    assert "trackstar" in ALL_SCORE_MODES and "trackstar" not in DEFAULT_SCORE_MODES
    assert ScoreConfig().modes == list(DEFAULT_SCORE_MODES)
    assert {"hybrid-rrf-trackstar", "hybrid-rerank-trackstar"} <= set(HYBRID_MODES)
    assert "task_mix" not in ScoreConfig().model_dump()  # old score run ids unchanged
    with pytest.raises(ValueError, match="task_mix"):
        ScoreConfig(task_mix=1.0)
    curv, _ = curvature_and_inverse(G, "raw")
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        curv.mixed(Q, 1.5)
    assert isinstance(curv.mixed(Q, 0.0), Curvature) and curv.mixed(Q, 0.0) is curv


def test_checkpoint_sum_is_the_weighted_sum_of_each_checkpoints_modes(shared_queries):
    """TracIn over checkpoints: each checkpoint its own gradients and curvature, every mode summed with weights."""
    G, Q = shared_queries
    G2, Q2 = G.flip(0) * 0.5 + 0.1, Q * 2 - 0.3
    modes = ["dot", "influence", "relatif", "cosine", "trackstar"]
    curv1, curv2 = fit(G), fit(G2, kind="ekfac")
    s1 = Scorer(Q, curv1, modes, top_k=4, full_matrix_size=40, dtype=torch.float64)
    s2 = Scorer(Q2, curv2, modes, top_k=4, dtype=torch.float64)
    ids = torch.arange(40)
    for lo in range(0, 40, 11):
        s1.keep(
            ids[lo : lo + 11],
            checkpoint_sum([s1, s2], [1.0, 0.25], ids[lo : lo + 11], [G[lo : lo + 11], G2[lo : lo + 11]]),
        )
    for mode in modes:
        one = Scorer(Q, curv1, [mode], top_k=4, full_matrix_size=40, dtype=torch.float64)
        two = Scorer(Q2, curv2, [mode], top_k=4, full_matrix_size=40, dtype=torch.float64)
        one.update(ids, G)
        two.update(ids, G2)
        expected = one.full[mode] + 0.25 * two.full[mode]
        assert torch.allclose(s1.full[mode], expected, atol=1e-10), mode
        assert torch.equal(s1.topk[mode].ids, torch.topk(expected, 4, dim=1).indices)
    assert s1.pairs == 40 * 5
    with pytest.raises(ValueError, match="one scorer"):
        checkpoint_sum([s1], [1.0, 2.0], ids, [G])


def test_mixed_is_computed_once_per_query_set(shared_queries):
    G, Q = shared_queries
    curv = fit(G)
    first = curv.mixed(Q, 0.5)
    assert curv.mixed(Q.clone(), 0.5) is first  # same queries, same weight: the same eigendecomposition
    assert curv.mixed(Q, 0.25) is not first and curv.mixed(Q[:2], 0.5) is not first


def test_trackstar_curvature_of_a_block_past_any_dense_size():
    """A 130 × 130 block (16,900 dims: its dense Fisher would take 2.1 GiB) gets its EKFAC in two passes and its
    task curvature by Woodbury: (T + λI) applied, without a dense matrix, to (T + λI)^-1 v gives v back."""
    from dataworth.attribution.curvature import fit_fisher

    layout = Layout((Block("wide", 130, 130, 0),))
    torch.manual_seed(3)
    G = torch.randn(12, layout.dim, dtype=torch.float64)
    Q = torch.randn(3, layout.dim, dtype=torch.float64)
    curv = fit_fisher(layout, CurvatureConfig(kind="ekfac", max_block_dim=130), lambda: G.split(5))
    w = 0.4
    task = curv.mixed(Q, w)
    v = torch.randn(2, layout.dim, dtype=torch.float64)
    x = task.apply(v, -1.0)
    lam = curv.damping["wide"]
    fisher_x = curv.apply(x, 1.0) - lam * x  # F x
    fq_x = (x @ Q.T) @ Q / Q.shape[0]  # F_q x
    trace_f, trace_q = float(curv.blocks["wide"][0].sum()), float(Q.square().sum()) / Q.shape[0]
    back = (1 - w) * fisher_x + w * trace_f / trace_q * fq_x + lam * x
    assert torch.allclose(back, v, atol=1e-8)
    assert torch.allclose(task.whitened_norms(v).square(), (v * x).sum(1), atol=1e-8)
