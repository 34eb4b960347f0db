"""Fisher, damping and every score mode against explicit matrix formulas (fp64)."""

import pytest
import torch

from dataworth.attribution.curvature import Curvature, FisherAccumulator
from dataworth.attribution.projection import Block, Layout
from dataworth.attribution.scoring import Scorer, TopK
from dataworth.config import CurvatureConfig

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


def fit(G, factor=0.1, batch=7):
    acc = FisherAccumulator(LAYOUT, CurvatureConfig(kind="raw", damping_factor=factor))
    for s in range(0, G.shape[0], batch):
        acc.update(G[s : s + batch])
    return acc.finalize()


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


@pytest.mark.parametrize("kind", ["raw", "identity"])
@pytest.mark.parametrize("mode", ["dot", "influence", "relatif", "cosine"])
def test_score_modes_match_explicit(data, kind, mode):
    G, Q = data
    curv = fit(G, 0.2) if kind == "raw" else Curvature.identity(LAYOUT)
    Minv = torch.linalg.inv(explicit_fisher(G, 0.2)) if kind == "raw" else torch.eye(LAYOUT.dim, dtype=torch.float64)
    expected = explicit_scores(G, Q, Minv, mode)
    ids = torch.arange(G.shape[0])
    scorer = Scorer(Q, curv, [mode], top_k=5, full_matrix_size=G.shape[0], dtype=torch.float64)
    for s in range(0, 40, 9):
        scorer.update(ids[s : s + 9], G[s : s + 9])
    assert torch.allclose(scorer.full[mode], expected, atol=1e-9)
    top = torch.topk(expected, 5, dim=1)
    assert torch.equal(scorer.topk[mode].ids, top.indices)
    assert torch.allclose(scorer.topk[mode].scores, top.values, atol=1e-9)
    assert scorer.pairs == 40 * 5


def test_query_batching_and_train_batching_invariance(data):
    G, Q = data
    curv = fit(G)
    ids = torch.arange(G.shape[0])
    modes = ["dot", "influence", "relatif", "cosine"]

    def run(q, batch):
        sc = Scorer(q, curv, modes, top_k=7, dtype=torch.float64)
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


def test_zero_gradient_rows_score_zero(data):
    G, Q = data
    G = G.clone()
    G[3] = 0
    sc = Scorer(Q, fit(G), ["relatif", "cosine"], top_k=3, full_matrix_size=40, dtype=torch.float64)
    sc.update(torch.arange(40), G)
    for m in ("relatif", "cosine"):
        assert torch.isfinite(sc.full[m]).all() and (sc.full[m][:, 3] == 0).all()


def test_oversized_block_is_refused():
    with pytest.raises(ValueError, match="max_block_dim"):
        FisherAccumulator(LAYOUT, CurvatureConfig(kind="raw", max_block_dim=5))
