"""LoGra hook gradients against explicit autograd per-example gradients in fp64."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from dataworth.collector import GradientCollector, per_example_loss
from dataworth.config import LoggingConfig
from dataworth.data import collate
from dataworth.projection import draw_projection, select_modules

SEQS = [[3, 7, 9, 11, 2, 5], [4, 8], [10, 12, 14, 16, 18, 20, 22, 24], [1, 2, 3]]


def reference_gradients(model, cfg, seqs, label_masks=None):
    """Per-example gradients one sequence at a time (no padding), projected explicitly."""
    modules = select_modules(model, cfg.modules, cfg.exclude_modules)
    rows = []
    for i, seq in enumerate(seqs):
        ids, att, labels = collate([seq], 0, None if label_masks is None else [label_masks[i]])
        logits = model(input_ids=ids, attention_mask=att).logits
        loss = per_example_loss(logits, labels, cfg.loss_reduction).sum()
        weights = [m.weight for m in modules.values()]
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        parts = []
        for (name, m), g in zip(modules.items(), grads):
            if g is None:
                g = torch.zeros_like(m.weight)
            if isinstance(m, Conv1D):
                g = g.T  # Conv1D stores (in, out); gradients are laid out (out, in)
            d_out, d_in = g.shape
            p_out = draw_projection(cfg.projection, min(cfg.proj_dim_out, d_out), d_out, cfg.seed, name, "out")
            p_in = draw_projection(cfg.projection, min(cfg.proj_dim_in, d_in), d_in, cfg.seed, name, "in")
            if p_out is not None:
                g = p_out @ g
            if p_in is not None:
                g = g @ p_in.T
            parts.append(g.reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def hook_gradients(model, cfg, seqs, label_masks=None, batch_size=None):
    out = []
    batch_size = batch_size or len(seqs)
    with GradientCollector(model, cfg) as c:
        for s in range(0, len(seqs), batch_size):
            masks = None if label_masks is None else label_masks[s : s + batch_size]
            ids, att, labels = collate(seqs[s : s + batch_size], 0, masks)
            g, _ = c.batch_gradients(ids, att, labels)
            out.append(g)
    return torch.cat(out)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_identity_projection_equals_autograd(tiny_model, reduction):
    cfg = LoggingConfig(projection="identity", loss_reduction=reduction)
    expected = reference_gradients(tiny_model, cfg, SEQS)
    got = hook_gradients(tiny_model, cfg, SEQS)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, atol=1e-10, rtol=1e-8)
    assert expected.abs().sum() > 0


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_random_projection_equals_projected_autograd(tiny_model, kind):
    cfg = LoggingConfig(projection=kind, proj_dim_in=4, proj_dim_out=3, seed=7)
    expected = reference_gradients(tiny_model, cfg, SEQS)
    got = hook_gradients(tiny_model, cfg, SEQS)
    assert torch.allclose(got, expected, atol=1e-10, rtol=1e-8)


def test_padding_and_ignored_labels(tiny_model):
    """Masked labels (-100) contribute nothing; padding never leaks into a gradient."""
    cfg = LoggingConfig(projection="gaussian", proj_dim_in=4, proj_dim_out=4)
    masks = [[i >= len(s) // 2 for i in range(len(s))] for s in SEQS]
    expected = reference_gradients(tiny_model, cfg, SEQS, masks)
    got = hook_gradients(tiny_model, cfg, SEQS, masks)
    assert torch.allclose(got, expected, atol=1e-10, rtol=1e-8)
    # A one-token example has no next-token loss, so its gradient is exactly zero.
    lone = hook_gradients(tiny_model, cfg, [[5], [1, 2, 3]])
    assert torch.count_nonzero(lone[0]) == 0 and torch.count_nonzero(lone[1]) > 0


def test_batch_size_invariance(tiny_model):
    cfg = LoggingConfig(projection="gaussian", proj_dim_in=4, proj_dim_out=4)
    full = hook_gradients(tiny_model, cfg, SEQS)
    for bs in (1, 3):
        assert torch.allclose(hook_gradients(tiny_model, cfg, SEQS, batch_size=bs), full, atol=1e-10)


def test_projection_is_seeded_by_module_name():
    a = draw_projection("gaussian", 4, 10, 0, "layer.a", "in")
    assert torch.equal(a, draw_projection("gaussian", 4, 10, 0, "layer.a", "in"))
    assert not torch.equal(a, draw_projection("gaussian", 4, 10, 0, "layer.b", "in"))
    assert not torch.equal(a, draw_projection("gaussian", 4, 10, 1, "layer.a", "in"))
    r = draw_projection("rademacher", 4, 10, 0, "layer.a", "in")
    assert set((r * 2).abs().unique().tolist()) == {1.0}


def test_collector_restores_model_state(tiny_model):
    flags = [p.requires_grad for p in tiny_model.parameters()]
    n_hooks = sum(len(m._forward_hooks) for m in tiny_model.modules())
    with pytest.raises(RuntimeError):
        with GradientCollector(tiny_model, LoggingConfig()):
            raise RuntimeError("boom")
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert sum(len(m._forward_hooks) for m in tiny_model.modules()) == n_hooks


def test_module_selection_errors(tiny_model):
    with pytest.raises(ValueError, match="matches no Linear/Conv1D"):
        GradientCollector(tiny_model, LoggingConfig(modules=["no.such.layer*"]))
    with pytest.raises(ValueError, match="removed by exclude_modules"):
        GradientCollector(tiny_model, LoggingConfig(modules=["*"], exclude_modules=["*"]))
    only = GradientCollector(tiny_model, LoggingConfig(modules=["*.0.*"]))
    assert only.layout.blocks and all(".0." in b.name for b in only.layout.blocks)
    assert all("lm_head" not in b.name for b in GradientCollector(tiny_model, LoggingConfig()).layout.blocks)


def test_bfloat16_model_is_close_to_float32():
    """Low-precision models run through the same hooks; projections stay in float32."""
    from tiny import make_tiny_llama

    cfg = LoggingConfig(projection="gaussian", proj_dim_in=4, proj_dim_out=4)
    ref = hook_gradients(make_tiny_llama(dtype=torch.float32), cfg, SEQS)
    low = hook_gradients(make_tiny_llama(dtype=torch.bfloat16), cfg, SEQS)
    assert low.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(low, ref, dim=1)
    assert (cos > 0.95).all()


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny_model):
    cfg = LoggingConfig(projection="gaussian", proj_dim_in=4, proj_dim_out=4)
    cpu = hook_gradients(tiny_model, cfg, SEQS)
    gpu = hook_gradients(tiny_model.to("cuda"), cfg, SEQS)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-8)
