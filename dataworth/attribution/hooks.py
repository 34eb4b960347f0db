"""LoGra per-example gradients computed in hooks, never materializing a weight gradient.

For a linear layer applied at every position t, an example's weight gradient is
Σ_t dy_t x_t^T, so its projection P_out (Σ_t dy_t x_t^T) P_in^T = Σ_t (P_out dy_t)(P_in x_t)^T
is built from the projected activation (forward hook) and the projected output gradient
(a tensor hook on the layer's output). Parameters are frozen while collecting, so autograd
computes only activation gradients.

Under `projection="rapidgrad"` the layer's whole per-example gradient Σ_t dy_t x_t^T is formed
instead, in the layer's backward hook, and compressed there (`dataworth.attribution.rapidgrad`):
B·d_out·d_in floats of one layer at a time, of which only the K-dim result is kept.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from dataworth.attribution.projection import FittedProjections, Layout, Projector, select_modules
from dataworth.config import LoggingConfig
from dataworth.errors import ModelError
from dataworth.losses import per_example_loss


class BackwardHooks(AbstractContextManager):
    """Per-module forward and backward hooks around one forward/backward pass per batch.

    Parameters are frozen while the hooks are in (autograd then computes activation
    gradients only); the context manager always removes the hooks and restores the flags.
    Subclasses say what to keep of a module's input (`_capture`, in the forward pass) and
    what to do with it and the output gradient (`_consume`, in the backward pass).
    """

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], loss_reduction: str):
        self.model = model
        self.modules = modules
        self.loss_reduction = loss_reduction
        param = next(model.parameters())
        self.device = param.device
        self.model_dtype = param.dtype
        self.dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        # The dtype a module's input and output gradient are handed to _capture/_consume in (subclasses may
        # keep the model's half precision there and cast only what they keep).
        self.capture_dtype = self.dtype
        self._handles: list = []
        self._saved_flags: list[tuple[nn.Parameter, bool]] = []
        self._mask: torch.Tensor | None = None
        self._padded = True
        self._active = False

    # -- context management -------------------------------------------------------------
    def __enter__(self):
        embeddings = self.model.get_input_embeddings()
        if embeddings is None:
            raise ModelError(f"{type(self.model).__name__} has no input embeddings; cannot start the backward pass")
        self._saved_flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._saved_flags:
            p.requires_grad_(False)
        # Frozen weights still need a graph from the input on, so the embedding output requires grad.
        self._handles.append(embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, flag in self._saved_flags:
            p.requires_grad_(flag)
        self._saved_flags.clear()

    # -- hooks ----------------------------------------------------------------------------
    def _forward_hook(self, name: str):
        def hook(_module, inputs, output):
            if not self._active or not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = inputs[0]
            batch, length = self._mask.shape
            # A 2-D input is either every position of the batch flattened, (batch·time, features), as OPT's MLP
            # sees them, or one row per example, (batch, features): both become (batch, time, features).
            flat = x.dim() == 2 and length > 1 and x.shape[0] == batch * length
            x = x.reshape(batch, length, -1) if flat else x.unsqueeze(1) if x.dim() == 2 else x
            if x.shape[0] != batch:
                raise ModelError(
                    f"module {name!r} sees a leading dimension {x.shape[0]} but the batch has {batch} sequences of "
                    f"{length} positions; layers that mix examples (e.g. token-routed experts) cannot be tracked, "
                    "exclude them"
                )
            kept = self._capture(name, x.to(self.capture_dtype))

            def backward(grad_out: torch.Tensor):
                dy = grad_out.to(self.capture_dtype)
                dy = dy.reshape(batch, length, -1) if flat else dy.unsqueeze(1) if dy.dim() == 2 else dy
                self._consume(name, kept, dy)

            output.register_hook(backward)

        return hook

    def _masked(self, t: torch.Tensor) -> torch.Tensor:
        """Zero the padded positions of a (batch, time, features) activation (applied after any projection:
        cheaper on the smaller tensor); a batch without padding is returned as it is."""
        return t * self._mask[:, :, None] if self._padded and t.shape[1] == self._mask.shape[1] else t

    def _capture(self, name: str, x: torch.Tensor):
        raise NotImplementedError

    def _consume(self, name: str, kept, dy: torch.Tensor) -> None:
        raise NotImplementedError

    def _backward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One forward/backward pass of the summed per-example losses; returns those losses."""
        if not self._handles:
            raise RuntimeError(f"{type(self).__name__} must be entered (`with {type(self).__name__}(...) as c:`) first")
        input_ids = input_ids.to(self.device)
        self._padded = not bool(attention_mask.all())  # read on the host, before the copy to the device
        attention_mask = attention_mask.to(self.device)
        labels = labels.to(self.device)
        self._mask = attention_mask.to(self.dtype)
        self._active = True
        try:
            with torch.enable_grad():
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
                losses = per_example_loss(logits, labels, self.loss_reduction)
                # Sum, not mean: each example's gradient must be its own loss's gradient.
                losses.sum().backward()
        finally:
            self._active = False
        return losses.detach()


class GradientCollector(BackwardHooks):
    """Hooks that turn one backward pass into per-example projected gradients.

    Use as a context manager, then call `batch_gradients` per batch. The result is a
    (batch, layout.dim) tensor in the projection dtype: float64 when the model is float64,
    float32 otherwise. `fitted` holds the projections of an index whose projections were
    fitted to the data (`precondition="kfac"`, see `dataworth.attribution.kfac`).

    The hooks only project (one matmul per side and module); the per-example products
    Σ_t (P_out dy_t)(P_in x_t)ᵀ of all modules with the same shapes are formed after the
    backward pass as one batched product, so a batch costs a few kernel launches per module,
    not a dozen (on a GPU the launches, not the arithmetic, bound small batches).

    Under `projection="rapidgrad"` no side is projected: each module's full per-example gradient is
    formed in its backward hook (B·d_out·d_in floats, one module at a time) and folded to K dims there,
    after the optimizer-state scales, if any, are applied to x and dy.
    """

    def __init__(self, model: nn.Module, cfg: LoggingConfig, fitted: "FittedProjections | None" = None):
        super().__init__(model, select_modules(model, cfg.modules, cfg.exclude_modules), cfg.loss_reduction)
        self.cfg = cfg
        self.projector = Projector(self.modules, cfg, fitted)
        self.layout: Layout = self.projector.layout
        # name -> [(projected output gradient, projected input)] of each call of the module in this batch
        self._pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._done: dict[str, torch.Tensor] = {}  # name -> (B, k_out·k_in) of modules with an unprojected side
        if cfg.projection_dtype == "model" and self.model_dtype in (torch.bfloat16, torch.float16):
            self.capture_dtype = self.model_dtype
        self.rapidgrad = cfg.projection == "rapidgrad"
        # rapidgrad: calls of each module in this forward pass whose backward has not run yet, and the summed full
        # gradient of a module called more than once (it is normalized and folded whole, after its last call).
        self._calls: dict[str, int] = {}
        self._partial: dict[str, torch.Tensor] = {}
        # Modules with a side kept whole (projection identity): their products are formed in their backward hook.
        self._unprojected = {
            name
            for name in self.modules
            if any(self.projector.get(name, side, self.device, self.capture_dtype) is None for side in ("in", "out"))
        }

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._reset()

    def _reset(self) -> None:
        self._pairs, self._done, self._calls, self._partial = {}, {}, {}, {}

    def _capture(self, name: str, x: torch.Tensor) -> torch.Tensor:
        # detached: the projection is no part of the model's graph, and must not keep x alive through one
        x = x.detach()
        if self.rapidgrad:
            self._calls[name] = self._calls.get(name, 0) + 1
            s_in = self.projector.scale(name, "in", x.device, self.capture_dtype)
            return self._masked(x if s_in is None else x * s_in)  # [B, T, d_in]
        p_in = self.projector.get(name, "in", x.device, self.capture_dtype)
        return self._masked(x if p_in is None else x @ p_in.T)  # [B, T, d_in] @ [d_in, k_in] → [B, T, k_in]

    def _consume(self, name: str, x_proj: torch.Tensor, dy: torch.Tensor) -> None:
        if self.rapidgrad:
            self._consume_rapidgrad(name, x_proj, dy)
            return
        p_out = self.projector.get(name, "out", dy.device, self.capture_dtype)
        dy_proj = dy if p_out is None else dy @ p_out.T  # [B, T, d_out] → [B, T, k_out]
        if name in self._unprojected:
            # An unprojected side is a full activation: its product is formed now, so that it is not held
            # until the end of the backward pass (exact gradients, `projection: identity`).
            g = torch.einsum("bto,bti->boi", dy_proj.to(self.dtype), x_proj.to(self.dtype)).reshape(dy.shape[0], -1)
            self._done[name] = g if name not in self._done else self._done[name] + g
            return
        self._pairs.setdefault(name, []).append((dy_proj, x_proj))

    def _consume_rapidgrad(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        s_out = self.projector.scale(name, "out", dy.device, self.capture_dtype)
        dy = dy if s_out is None else dy * s_out
        # [B, T, d_out] x [B, T, d_in] → [B, d_out, d_in] → [B, d_out·d_in]: row-major G, as the weight is laid out
        g = torch.einsum("bto,bti->boi", dy.to(self.dtype), x.to(self.dtype)).reshape(dy.shape[0], -1)
        if name in self._partial:
            g = self._partial.pop(name) + g
        self._calls[name] -= 1
        if self._calls[name] > 0:  # a shared module: its gradient is the sum over its calls, normalized whole
            self._partial[name] = g
            return
        self._done[name] = self.projector.compressor(name, g.device)(g)  # [B, K]

    @torch.no_grad()
    def _products(self, batch: int) -> dict[str, torch.Tensor]:
        """name -> (B, k_out·k_in) per-example gradient of every module that took part, from the projected
        pairs the hooks kept: modules of equal shapes are stacked and multiplied at once, in self.dtype."""
        groups: dict[tuple, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for name, pairs in self._pairs.items():
            # A module called several times per forward (shared layers) sums its calls: Σ over the calls'
            # positions is one sum over their concatenated positions.
            dy = pairs[0][0] if len(pairs) == 1 else torch.cat([p[0] for p in pairs], dim=1)
            x = pairs[0][1] if len(pairs) == 1 else torch.cat([p[1] for p in pairs], dim=1)
            groups.setdefault((tuple(dy.shape), tuple(x.shape)), []).append((name, dy, x))
        out = dict(self._done)
        for name, g in self._partial.items():  # rapidgrad: a call whose output got no gradient never reported back
            out[name] = self.projector.compressor(name, g.device)(g)
        for members in groups.values():
            dys = torch.stack([m[1] for m in members]).to(self.dtype)  # [M, B, T, k_out]
            xs = torch.stack([m[2] for m in members]).to(self.dtype)  # [M, B, T, k_in]
            g = torch.einsum("mbto,mbti->mboi", dys, xs)  # [M, B, k_out, k_in]
            for j, (name, _, _) in enumerate(members):
                out[name] = g[j].reshape(batch, -1)
        return out

    def batch_gradients(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-example projected gradients (B, dim), per-example losses (B,))."""
        self._reset()
        try:
            losses = self._backward(input_ids, attention_mask, labels)
            batch = input_ids.shape[0]
            grads = self._products(batch)
        finally:
            self._reset()
        parts = []
        for block in self.layout.blocks:
            g = grads.get(block.name)
            if g is None:  # the layer did not take part in this loss (e.g. an unused branch)
                g = torch.zeros(batch, block.k_out * block.k_in, dtype=self.dtype, device=self.device)
            parts.append(g)
        return torch.cat(parts, dim=1), losses
