"""LoGra hook gradients against explicit autograd per-example gradients in fp64."""

import pytest
import torch
from gradcheck import (
    SEQS,
    _Tok,
    cross_device_tolerance,
    hook_gradients,
    plain,
    reference_gradients,
    relative_error,
)
from tiny import make_tiny_gpt2, make_tiny_llama, make_tiny_mixtral

from dataworth.attribution.hooks import GradientCollector
from dataworth.attribution.projection import draw_projection
from dataworth.errors import ConfigError


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_identity_projection_equals_autograd(tiny_model, reduction):
    cfg = plain(projection="identity", loss_reduction=reduction)
    expected = reference_gradients(tiny_model, cfg, SEQS)
    got = hook_gradients(tiny_model, cfg, SEQS)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, atol=1e-10, rtol=1e-8)
    assert expected.abs().sum() > 0


@pytest.mark.parametrize("kind", ["gaussian", "orthogonal", "rademacher"])
def test_random_projection_equals_projected_autograd(tiny_model, kind):
    cfg = plain(projection=kind, proj_dim_in=4, proj_dim_out=3, seed=7)
    expected = reference_gradients(tiny_model, cfg, SEQS)
    got = hook_gradients(tiny_model, cfg, SEQS)
    assert torch.allclose(got, expected, atol=1e-10, rtol=1e-8)


def test_padding_and_ignored_labels(tiny_model):
    """Masked labels (-100) contribute nothing; padding never leaks into a gradient."""
    cfg = plain(projection="gaussian", proj_dim_in=4, proj_dim_out=4)
    masks = [[i >= len(s) // 2 for i in range(len(s))] for s in SEQS]
    expected = reference_gradients(tiny_model, cfg, SEQS, masks)
    got = hook_gradients(tiny_model, cfg, SEQS, masks)
    assert torch.allclose(got, expected, atol=1e-10, rtol=1e-8)
    # A one-token example has no next-token loss, so its gradient is exactly zero.
    lone = hook_gradients(tiny_model, cfg, [[5], [1, 2, 3]])
    assert torch.count_nonzero(lone[0]) == 0 and torch.count_nonzero(lone[1]) > 0


def test_batch_size_invariance(tiny_model):
    cfg = plain(projection="gaussian", proj_dim_in=4, proj_dim_out=4)
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


def test_orthogonal_projection_rows():
    """Orthonormal rows scaled by sqrt(d / k): P Pᵀ = (d / k) I, so E||P v||² = ||v||² as for a Gaussian; at k = d
    the projection is an orthogonal matrix and keeps every inner product exactly, where a square Gaussian does not."""
    p = draw_projection("orthogonal", 4, 10, 0, "layer.a", "in")
    assert p.shape == (4, 10)
    assert torch.allclose(p @ p.T, torch.eye(4, dtype=torch.float64) * 10 / 4, atol=1e-12)
    assert torch.equal(p, draw_projection("orthogonal", 4, 10, 0, "layer.a", "in"))
    assert not torch.equal(p, draw_projection("orthogonal", 4, 10, 0, "layer.b", "in"))
    square = draw_projection("orthogonal", 16, 16, 3, "layer.a", "out")
    u, v = torch.randn(2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose((square @ u) @ (square @ v), u @ v, atol=1e-12)
    gaussian = torch.linalg.svdvals(draw_projection("gaussian", 16, 16, 3, "layer.a", "out"))
    assert gaussian.max() / gaussian.min() > 2  # the ill-conditioning the orthogonal kind removes
    # Over many draws the squared norm is kept on average, with less spread than a Gaussian's.
    v = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    norms = {
        kind: torch.stack([(draw_projection(kind, 8, 64, 0, f"m{i}", "in") @ v).square().sum() for i in range(400)])
        for kind in ("orthogonal", "gaussian")
    }
    assert abs(norms["orthogonal"].mean() / v.square().sum() - 1) < 0.05
    assert norms["orthogonal"].std() < norms["gaussian"].std()
    with pytest.raises(ConfigError, match="at most as many rows"):
        draw_projection("orthogonal", 11, 10, 0, "layer.a", "in")


def test_collector_restores_model_state(tiny_model):
    flags = [p.requires_grad for p in tiny_model.parameters()]
    n_hooks = sum(len(m._forward_hooks) for m in tiny_model.modules())
    with pytest.raises(RuntimeError):
        with GradientCollector(tiny_model, plain()):
            raise RuntimeError("boom")
    assert [p.requires_grad for p in tiny_model.parameters()] == flags
    assert sum(len(m._forward_hooks) for m in tiny_model.modules()) == n_hooks


def test_module_selection_errors(tiny_model):
    with pytest.raises(ValueError, match="matches no Linear/Conv1D"):
        GradientCollector(tiny_model, plain(modules=["no.such.layer*"]))
    with pytest.raises(ValueError, match="removed by exclude_modules"):
        GradientCollector(tiny_model, plain(modules=["*"], exclude_modules=["*"]))
    only = GradientCollector(tiny_model, plain(modules=["*.0.*"]))
    assert only.layout.blocks and all(".0." in b.name for b in only.layout.blocks)
    assert all("lm_head" not in b.name for b in GradientCollector(tiny_model, plain()).layout.blocks)


def test_bfloat16_model_is_close_to_float32():
    """Low-precision models run through the same hooks; projections stay in float32."""
    from tiny import make_tiny_llama

    cfg = plain(projection="gaussian", proj_dim_in=4, proj_dim_out=4)
    ref = hook_gradients(make_tiny_llama(dtype=torch.float32), cfg, SEQS)
    low = hook_gradients(make_tiny_llama(dtype=torch.bfloat16), cfg, SEQS)
    assert low.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(low, ref, dim=1)
    assert (cos > 0.95).all()


def test_projection_in_the_model_dtype():
    """projection_dtype='model' projects a bfloat16 model's activations in bfloat16: the result stays float32,
    within the bfloat16 model's own error of the float32 model's gradients and close to the float32 projection
    of the same bfloat16 model; on a float32 or float64 model it is the same computation bit for bit."""
    from tiny import make_tiny_llama

    cfg = plain(projection="gaussian", proj_dim_in=4, proj_dim_out=4)
    model_cfg = cfg.model_copy(update={"projection_dtype": "model"})
    ref = hook_gradients(make_tiny_llama(dtype=torch.float32), cfg, SEQS)
    low = make_tiny_llama(dtype=torch.bfloat16)
    fp32_proj = hook_gradients(low, cfg, SEQS)
    bf16_proj = hook_gradients(low, model_cfg, SEQS)
    assert bf16_proj.dtype == torch.float32
    assert not torch.equal(bf16_proj, fp32_proj)  # it did project in bfloat16
    assert relative_error(bf16_proj, fp32_proj) < 0.05
    assert (torch.nn.functional.cosine_similarity(bf16_proj, ref, dim=1) > 0.95).all()
    for dtype in (torch.float32, torch.float64):
        model = make_tiny_llama(dtype=dtype)
        assert torch.equal(hook_gradients(model, model_cfg, SEQS), hook_gradients(model, cfg, SEQS))
    assert "projection_dtype" not in cfg.model_dump()  # at its default: fingerprints of older indexes unchanged


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny_model):
    cfg = plain(projection="gaussian", proj_dim_in=4, proj_dim_out=4)
    cpu = hook_gradients(tiny_model, cfg, SEQS)
    gpu = hook_gradients(tiny_model.to("cuda"), cfg, SEQS)
    assert gpu.device.type == "cuda"
    assert relative_error(gpu.cpu(), cpu) < cross_device_tolerance(tiny_model)


class _SharedLayerLM(torch.nn.Module):
    """A causal LM whose `shared` Linear runs twice per forward and whose `pooled` Linear sees (batch,
    features) inputs: the hooks' deferred products must sum a module's calls and handle T = 1."""

    def __init__(self, vocab=31, width=8):
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(vocab, width)
        self.shared = torch.nn.Linear(width, width)
        self.wide = torch.nn.Linear(width, 2 * width)
        self.pooled = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(2 * width, vocab)
        self.double()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)  # [B, T, W]
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        mask = attention_mask[:, :, None].to(h.dtype)
        pooled = self.pooled((h * mask).sum(1) / mask.sum(1))  # [B, W]: one call per example
        h = torch.cumsum(h, dim=1) + pooled[:, None, :]  # causal mixing
        return type("Out", (), {"logits": self.head(torch.tanh(self.wide(h)))})()


@pytest.mark.parametrize("projection", ["identity", "gaussian"])
def test_shared_layer_and_pooled_layer(projection):
    model = _SharedLayerLM()
    cfg = plain(projection=projection, proj_dim_in=3, proj_dim_out=5, exclude_modules=["head"])
    expected = reference_gradients(model, cfg, SEQS)
    got = hook_gradients(model, cfg, SEQS)
    assert torch.allclose(got, expected, atol=1e-10, rtol=1e-8)
    for bs in (1, 3):
        assert torch.allclose(hook_gradients(model, cfg, SEQS, batch_size=bs), expected, atol=1e-10, rtol=1e-8)


# Other decoder architectures than the fixture's GPT-2 and Llama, tiny and in fp64: OPT hands its MLP every position
# of the batch flattened to (batch·time, features); the others differ in fused projections, biases, parallel blocks
# and position schemes (rotary, ALiBi, learned).
_ARCHITECTURES = {
    "opt": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=24, word_embed_proj_dim=16),
    "gpt_neox": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24),
    "qwen2": dict(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=24
    ),
    "bloom": dict(hidden_size=16, n_layer=2, n_head=2),
    "falcon": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, new_decoder_architecture=False),
    "phi": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24),
}


@pytest.mark.parametrize("arch", sorted(_ARCHITECTURES))
def test_other_architectures_equal_autograd(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, vocab_size=61, max_position_embeddings=64, **_ARCHITECTURES[arch])
    model = AutoModelForCausalLM.from_config(config).to(torch.float64).eval()
    for cfg in (plain(projection="identity"), plain(projection="gaussian", proj_dim_in=4, proj_dim_out=3)):
        expected = reference_gradients(model, cfg, SEQS)
        assert expected.abs().sum() > 0
        # Padded together (SEQS differ in length) and one at a time: the same rows.
        for bs in (None, 1):
            got = hook_gradients(model, cfg, SEQS, batch_size=bs)
            assert torch.allclose(got, expected, atol=1e-10, rtol=1e-8), (arch, cfg.projection, bs)


def test_prompt_masked_examples_equal_autograd_on_the_response(tiny_model):
    """Examples with prompt or user-turn tokens (Example.label_mask False on them) log the gradient of the loss on
    the other tokens, batched with examples that have none."""
    from dataworth.attribution.gradients import log_example_gradients
    from dataworth.data import Example

    starts = [3, 0, 5, 1]
    masks = [[t >= k for t in range(len(s))] for s, k in zip(SEQS, starts)]
    masks[2] = [False, False, True, True, False, False, True, True]  # two assistant turns of a conversation
    examples = [Example(i, f"d{i}", 0, 0, len(s), s, label_mask=m) for i, (s, m) in enumerate(zip(SEQS, masks))]
    cfg = plain(projection="gaussian", proj_dim_in=4, proj_dim_out=3, batch_size=4)
    expected = reference_gradients(tiny_model, cfg, SEQS, masks)
    ids, got = next(log_example_gradients(tiny_model, _Tok(), examples, cfg))
    got = got.double()[ids.argsort()]
    assert torch.allclose(got, expected.float().double(), atol=1e-6, rtol=1e-5)
    unmasked = reference_gradients(tiny_model, cfg, SEQS)
    assert relative_error(got[0], unmasked[0]) > 1e-3  # the prompt's loss is left out, not only reweighted


def test_untracked_weights_name_what_no_layer_holds():
    """Weight tensors outside every Linear/Conv1D layer and the embeddings (fused MoE experts, a router's bare weight,
    a convolution) are listed with their sizes; a model of Linear layers has none."""
    from dataworth.attribution.projection import untracked_weights

    assert untracked_weights(make_tiny_gpt2()) == {} and untracked_weights(make_tiny_llama()) == {}
    model = make_tiny_mixtral()
    got = untracked_weights(model)
    params = dict(model.named_parameters())
    assert got and all(params[n].dim() >= 2 and params[n].numel() == v for n, v in got.items())
    assert any(".experts." in n for n in got)
    assert not any(n.endswith(("q_proj.weight", "embed_tokens.weight", "lm_head.weight")) for n in got)

    class WithConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 4, 3)
            self.proj = torch.nn.Linear(4, 4)
            self.emb = torch.nn.Embedding(10, 4)

    assert untracked_weights(WithConv()) == {"conv.weight": 48}
