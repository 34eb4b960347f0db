"""Tracked-module selection and the Kronecker projections of LoGra.

A random projection is drawn from a generator seeded by (seed, module name), so it is
never stored: any worker, on any device, redraws the same matrix on the CPU. Projections
fitted to the data (KFAC-whitened, `dataworth.attribution.kfac`) are stored with the index as
`FittedProjections` and handed to the Projector.

`projection="rapidgrad"` replaces the Kronecker projection by RapidIn's compression of the whole
per-example gradient (`dataworth.attribution.rapidgrad`), drawn the same way: a module's block is
then one row of K, and its only fitted matrices are the optimizer-state correction's diagonal scales.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import math
from dataclasses import dataclass, field

import torch
from torch import nn

try:  # GPT-2 style layers: y = x @ W + b with W of shape (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]

from dataworth.attribution.rapidgrad import RapidGrad, folded_dim
from dataworth.config import LoggingConfig
from dataworth.errors import ConfigError, IndexMismatchError, ModelError


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear or GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D and isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    raise TypeError(f"{type(module).__name__} is not a Linear or Conv1D layer")


def is_trackable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or bool(Conv1D and isinstance(module, Conv1D))


def select_modules(model: nn.Module, include: list[str], exclude: list[str]) -> dict[str, nn.Module]:
    """Linear/Conv1D modules whose names match an include pattern and no exclude pattern.

    An include pattern that matches no linear layer is an error: it is almost always a typo,
    and silently logging fewer layers would change every score.
    """
    candidates = {name: m for name, m in model.named_modules() if name and is_trackable(m)}
    if not candidates:
        raise ModelError(f"{type(model).__name__} has no Linear or Conv1D layers to track")
    selected: dict[str, nn.Module] = {}
    for pattern in include:
        hits = [n for n in candidates if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            examples = ", ".join(list(candidates)[:6])
            raise ConfigError(
                f"module pattern {pattern!r} matches no Linear/Conv1D layer of {type(model).__name__}; "
                f"layer names look like: {examples} (patterns are fnmatch globs, e.g. 'transformer.h.*.mlp.*')"
            )
        for n in hits:
            selected[n] = candidates[n]
    selected = {
        n: m for n, m in candidates.items() if n in selected and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    }
    if not selected:
        raise ConfigError(
            f"every layer matched by {include} is removed by exclude_modules={exclude}; loosen one of them"
        )
    return selected


def _generator(seed: int, name: str, side: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}:{side}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def draw_projection(kind: str, k: int, d: int, seed: int, name: str, side: str) -> torch.Tensor | None:
    """A (k, d) projection scaled so E[||P v||²] = ||v||²; None stands for the identity."""
    if kind == "identity":
        return None
    gen = _generator(seed, name, side)
    if kind == "orthogonal":
        # Haar-random orthonormal rows (QR of a Gaussian, signs fixed by R's diagonal), scaled by sqrt(d / k):
        # the same E[||P v||²] = ||v||² as a Gaussian, with less spread of inner products (no two rows share a
        # direction), and exact inner products when k = d, where a square Gaussian is ill-conditioned.
        if k > d:
            raise ConfigError(f"an orthogonal projection has at most as many rows as columns; asked {k} rows of {d}")
        q, r = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)
        return q.T * math.sqrt(d / k)
    if kind == "gaussian":
        p = torch.randn(k, d, generator=gen, dtype=torch.float64)
    elif kind == "rademacher":
        p = torch.randint(0, 2, (k, d), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
    else:
        raise ConfigError(f"unknown projection {kind!r}; choose gaussian, orthogonal, rademacher or identity")
    return p / math.sqrt(k)


def draw_rapidgrad(d_out: int, d_in: int, k: int, seed: int, name: str, normalize: bool = True) -> RapidGrad:
    """RapidGrad's fixed permutation and signs of a (d_out × d_in) layer, folding to k (see `folded_dim`)."""
    return RapidGrad.draw(d_out * d_in, k, _generator(seed, name, "rapidgrad"), normalize)


def check_projection(cfg: LoggingConfig) -> None:
    """Refuse what projection='rapidgrad' cannot do; the Projector and `describe_layout` call it first, so a
    gradient-logging run stops before its first forward pass."""
    if cfg.projection == "rapidgrad" and cfg.precondition != "none":
        raise ConfigError(
            f"logging.projection='rapidgrad' with logging.precondition={cfg.precondition!r}: RapidGrad folds a layer's "
            "whole gradient, so there is no input or output side left to whiten with KFAC factors. Set "
            "logging.precondition='none' (--precondition none), or use a Kronecker projection (projection='gaussian') "
            "for KFAC-whitened gradients",
            fix="set logging.precondition='none' or logging.projection='gaussian'",
        )


def draw_pre_projection(kind: str, m: int, d: int, seed: int, name: str, side: str) -> torch.Tensor:
    """The (m, d) first projection R0 of a side too wide for an exact KFAC factor (see
    `dataworth.attribution.kfac.pre_projection_dims`). Its own generator: R0 must not share rows with the
    (k, m) projection R drawn for that side after the whitening. Gaussian for the orthogonal kind: R0 has
    m = wide_layer_dim rows, and a float64 QR of d × m at the widths that need it takes 1.2 s (m = 1,024) to 15 s
    (m = 4,096) per side at d = 14,336 on 2 cores, minutes over a Llama-3-8B's wide sides; its spread matters less
    there, since the whitening and R follow it."""
    p = draw_projection("gaussian" if kind == "orthogonal" else kind, m, d, seed, name, f"{side}:pre")
    if p is None:
        raise ConfigError("a pre-projection needs a random projection kind (gaussian or rademacher), not identity")
    return p


@dataclass(frozen=True)
class Block:
    """One module's slice of the flattened gradient vector: rows = k_out, cols = k_in (one row of K under
    projection='rapidgrad', whose folded vector has no (out, in) structure left: EKFAC on it is the raw Fisher)."""

    name: str
    k_out: int
    k_in: int
    offset: int

    @property
    def size(self) -> int:
        return self.k_out * self.k_in


@dataclass(frozen=True)
class Layout:
    blocks: tuple[Block, ...]

    @property
    def dim(self) -> int:
        return sum(b.size for b in self.blocks)

    def to_json(self) -> list[dict]:
        return [{"name": b.name, "k_out": b.k_out, "k_in": b.k_in, "offset": b.offset} for b in self.blocks]

    @classmethod
    def from_json(cls, items: list[dict]) -> "Layout":
        return cls(tuple(Block(**it) for it in items))

    def slices(self):
        for b in self.blocks:
            yield b, slice(b.offset, b.offset + b.size)


@dataclass
class FittedProjections:
    """Per-module (P_in, P_out) fitted to the data, stored with the index (float64 on the CPU)."""

    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]]
    meta: dict = field(default_factory=dict)

    @property
    def pre_projected(self) -> dict[str, dict[str, int]]:
        """{module: {side: m}} for the sides whitened after a first random projection to m dims (sides wider
        than max_factor_dim); empty for projections stored before wide layers were supported."""
        return self.meta.get("pre_projected", {})

    def digest(self) -> str:
        """Content hash: gradients logged with other projections must not be reused from a cache."""
        h = hashlib.sha256()
        for name in sorted(self.matrices):
            p_in, p_out = self.matrices[name]
            h.update(name.encode())
            h.update(p_in.to(torch.float64).contiguous().numpy().tobytes())
            h.update(p_out.to(torch.float64).contiguous().numpy().tobytes())
        return h.hexdigest()[:20]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"matrices": {n: (a.cpu(), b.cpu()) for n, (a, b) in self.matrices.items()}, "meta": self.meta}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "FittedProjections":
        state = torch.load(io.BytesIO(data), weights_only=True)
        return cls(dict(state["matrices"]), dict(state["meta"]))


class Projector:
    """Projections for every tracked module, cached per device/dtype."""

    def __init__(self, modules: dict[str, nn.Module], cfg: LoggingConfig, fitted: FittedProjections | None = None):
        check_projection(cfg)
        self.cfg = cfg
        self.dims = {name: layer_dims(m) for name, m in modules.items()}
        self.fitted = fitted
        self._cache: dict[tuple, torch.Tensor | RapidGrad | None] = {}
        blocks, offset = [], 0
        for name, (d_in, d_out) in self.dims.items():
            k_in, k_out = self.proj_dims(d_in, d_out)
            blocks.append(Block(name, k_out, k_in, offset))
            offset += k_out * k_in
        self.layout = Layout(tuple(blocks))
        if cfg.fitted and fitted is None:
            what = (
                f"logging.precondition={cfg.precondition!r}"
                if cfg.precondition != "none"
                else "logging.optimizer_state"
            )
            raise ConfigError(
                f"{what} needs projections fitted to the model "
                "(dataworth.attribution.kfac.fit_projections; the index flow fits and stores them): "
                "pass them as `fitted`, "
                "or set logging.precondition='none' and no optimizer_state for plain random projections"
            )
        if fitted is not None:
            self._check_fitted(fitted)

    def _check_fitted(self, fitted: FittedProjections) -> None:
        missing = [n for n in self.dims if n not in fitted.matrices]
        if missing:
            raise IndexMismatchError(
                f"the fitted projections have no matrices for modules {missing[:4]}; "
                "they were fitted for another module selection: refit them (rebuild the index)"
            )
        if self.cfg.projection == "rapidgrad":
            self._check_fitted_scales(fitted)
            return
        for b in self.layout.blocks:
            d_in, d_out = self.dims[b.name]
            p_in, p_out = fitted.matrices[b.name]
            if tuple(p_in.shape) != (b.k_in, d_in) or tuple(p_out.shape) != (b.k_out, d_out):
                raise IndexMismatchError(
                    f"fitted projections of {b.name!r} are {tuple(p_out.shape)} / {tuple(p_in.shape)}, the logging "
                    f"config asks for ({b.k_out}, {d_out}) / ({b.k_in}, {d_in}): refit them (rebuild the index)"
                )

    def _check_fitted_scales(self, fitted: FittedProjections) -> None:
        """Under rapidgrad the fitted matrices can only be a per-coordinate scaling of each side (the
        optimizer-state correction, diag(s) as `kfac.corrected_projections` stores it): anything else would
        need a Kronecker side to act on."""
        for name, (d_in, d_out) in self.dims.items():
            for side, p, d in zip(("in", "out"), fitted.matrices[name], (d_in, d_out)):
                if tuple(p.shape) != (d, d) or not torch.equal(p, torch.diag(p.diagonal())):
                    raise IndexMismatchError(
                        f"the fitted {side}put matrix of {name!r} ({tuple(p.shape)}, kind "
                        f"{fitted.meta.get('kind')!r}) is not a diagonal {d}×{d} scaling: projection='rapidgrad' takes "
                        "only the optimizer-state correction (precondition='none'); refit them with this logging "
                        "config (rebuild the index)"
                    )

    @classmethod
    def unfitted(cls, modules: dict[str, nn.Module], cfg: LoggingConfig) -> "Projector":
        """The projector of the seeded random projections alone, whatever cfg fits to the model (KFAC whitening,
        the optimizer-state correction): the stored layout, and the random part that fitted projections build on."""
        return cls(modules, cfg.model_copy(update={"precondition": "none", "optimizer_state": None}))

    def proj_dims(self, d_in: int, d_out: int) -> tuple[int, int]:
        """(k_in, k_out) of a module's block; (K, 1) under rapidgrad."""
        if self.cfg.projection == "identity":
            return d_in, d_out
        # Projecting to more rows than the layer has adds nothing but storage.
        k_in, k_out = min(self.cfg.proj_dim_in, d_in), min(self.cfg.proj_dim_out, d_out)
        if self.cfg.projection == "rapidgrad":
            # By default as many numbers as LoGra's block of the layer: the two compare at the same bytes.
            return folded_dim(self.cfg.rapidgrad_dim or k_out * k_in, d_out, d_in), 1
        return k_in, k_out

    def random(self, name: str, side: str) -> torch.Tensor | None:
        """The data-independent (k, d) projection of one side of a module (float64, CPU); None under
        rapidgrad, whose sides are kept whole (the whole gradient is formed, then compressed)."""
        if self.cfg.projection == "rapidgrad":
            return None
        d_in, d_out = self.dims[name]
        k_in, k_out = self.proj_dims(d_in, d_out)
        k, d = (k_in, d_in) if side == "in" else (k_out, d_out)
        return draw_projection(self.cfg.projection, k, d, self.cfg.seed, name, side)

    def get(self, name: str, side: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The (k, d) projection of one side, None for a side kept whole (identity, rapidgrad)."""
        if self.cfg.projection == "rapidgrad":
            return None
        key = (name, side, device, dtype)
        if key not in self._cache:
            if self.fitted is not None:
                p = self.fitted.matrices[name][0 if side == "in" else 1]
            else:
                p = self.random(name, side)
            self._cache[key] = None if p is None else p.to(device=device, dtype=dtype)
        return self._cache[key]

    def scale(self, name: str, side: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """rapidgrad: the optimizer-state scales s ([d]) of one side, the diagonal of its fitted diag(s); None
        without a correction."""
        if self.fitted is None:
            return None
        key = (name, side, "scale", device, dtype)
        if key not in self._cache:
            p = self.fitted.matrices[name][0 if side == "in" else 1]
            self._cache[key] = p.diagonal().to(device=device, dtype=dtype)
        return self._cache[key]

    def compressor(self, name: str, device: torch.device) -> RapidGrad:
        """rapidgrad: the module's fixed compression, drawn on the CPU once and kept on `device`."""
        key = (name, "rapidgrad", device)
        if key not in self._cache:
            d_in, d_out = self.dims[name]
            k, _ = self.proj_dims(d_in, d_out)
            cfg = self.cfg
            self._cache[key] = draw_rapidgrad(d_out, d_in, k, cfg.seed, name, cfg.rapidgrad_normalize).to(device)
        return self._cache[key]


def untracked_weights(model: nn.Module) -> dict[str, int]:
    """{name: size} of the model's weight tensors (parameters of two or more dimensions) that no Linear/Conv1D layer
    holds and that are not embeddings: what no logging config can track, so whose training signal is in no score.
    A mixture of experts whose experts are fused 3-D tensors, or a convolution, lands here. (Linear layers left out
    by the modules/exclude_modules patterns are a choice, and are not listed.)"""
    held = {
        id(p)
        for m in model.modules()
        if is_trackable(m) or isinstance(m, nn.Embedding)
        for p in m.parameters(recurse=False)
    }
    return {name: p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and id(p) not in held}


def describe_layout(model: nn.Module, cfg: LoggingConfig) -> tuple[Layout, int]:
    """(layout of the stored vector, number of weights it compresses) without running the model."""
    check_projection(cfg)
    modules = select_modules(model, cfg.modules, cfg.exclude_modules)
    # The layout does not depend on the fitted matrices, only on the dimensions.
    projector = Projector.unfitted(modules, cfg)
    return projector.layout, sum(d_in * d_out for d_in, d_out in projector.dims.values())
