"""Explicit references for the hook gradients: autograd per-example gradients, projected by hand."""

import torch
from transformers.pytorch_utils import Conv1D

from dataworth.attribution.hooks import GradientCollector, per_example_loss
from dataworth.attribution.projection import draw_projection, select_modules
from dataworth.config import LoggingConfig
from dataworth.data import Example, collate

SEQS = [[3, 7, 9, 11, 2, 5], [4, 8], [10, 12, 14, 16, 18, 20, 22, 24], [1, 2, 3]]


def plain(**kwargs) -> LoggingConfig:
    """Random projections only (the KFAC-whitened ones are tested in test_kfac.py)."""
    return LoggingConfig(precondition="none", **kwargs)


def reference_gradients(model, cfg, seqs, label_masks=None, fitted=None):
    """Per-example gradients one sequence at a time (no padding), projected explicitly
    (with the given fitted projections, else with freshly drawn random ones)."""
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
            if fitted is not None:
                p_in, p_out = fitted.matrices[name]
            else:
                p_out = draw_projection(cfg.projection, min(cfg.proj_dim_out, d_out), d_out, cfg.seed, name, "out")
                p_in = draw_projection(cfg.projection, min(cfg.proj_dim_in, d_in), d_in, cfg.seed, name, "in")
            if p_out is not None:
                g = p_out @ g
            if p_in is not None:
                g = g @ p_in.T
            parts.append(g.reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def hook_gradients(model, cfg, seqs, label_masks=None, batch_size=None, fitted=None):
    out = []
    batch_size = batch_size or len(seqs)
    with GradientCollector(model, cfg, fitted) as c:
        for s in range(0, len(seqs), batch_size):
            masks = None if label_masks is None else label_masks[s : s + batch_size]
            ids, att, labels = collate(seqs[s : s + batch_size], 0, masks)
            g, _ = c.batch_gradients(ids, att, labels)
            out.append(g)
    return torch.cat(out)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def cross_device_tolerance(model) -> float:
    """Relative error allowed between a CPU and a CUDA run of a float64 tiny model. Llama computes its
    RMSNorm and rotary embedding in float32 whatever the model's dtype, so there the two devices agree to
    float32 rounding only (measured on an H100: 1e-7 for Llama, 5e-16 for GPT-2)."""
    return 1e-6 if model.config.model_type == "llama" else 1e-12


class _Tok:
    pad_token_id = 0
    eos_token_id = 0


def examples(seqs):
    return [Example(i, f"d{i}", 0, 0, len(s), s) for i, s in enumerate(seqs)]


def explicit_factors(model, cfg, seqs):
    """Token-averaged x xᵀ and dy dyᵀ, one unpadded sequence at a time, dy from autograd.grad."""
    modules = select_modules(model, cfg.modules, cfg.exclude_modules)
    a = {n: 0.0 for n in modules}
    s = {n: 0.0 for n in modules}
    tokens = 0
    for seq in seqs:
        seen = {}
        handles = [
            m.register_forward_hook(lambda _m, i, o, n=n, seen=seen: seen.__setitem__(n, (i[0], o)))
            for n, m in modules.items()
        ]
        ids, att, labels = collate([seq], 0)
        emb = model.get_input_embeddings()
        hook = emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        logits = model(input_ids=ids, attention_mask=att).logits
        loss = per_example_loss(logits, labels, cfg.loss_reduction).sum()
        outs = [seen[n][1] for n in modules]
        dys = torch.autograd.grad(loss, outs, allow_unused=True)
        for h in [*handles, hook]:
            h.remove()
        for n, dy in zip(modules, dys):
            x = seen[n][0].detach().reshape(-1, seen[n][0].shape[-1])
            a[n] = a[n] + x.T @ x
            if dy is not None:
                dy = dy.detach().reshape(-1, dy.shape[-1])
                s[n] = s[n] + dy.T @ dy
        tokens += len(seq)
    return {n: (a[n] / tokens, s[n] / tokens) for n in modules}, tokens
