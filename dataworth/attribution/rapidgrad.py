"""RapidGrad (RapidIn, Lin et al. 2024): a layer's whole per-example gradient folded to K dims.

An alternative to LoGra's Kronecker projection. For a tracked layer, the per-example weight gradient G
(d_out × d_in, rows out and columns in; GPT-2's Conv1D laid out the same way) is flattened row-major to
g ∈ R^D, D = d_out·d_in, and compressed to c ∈ R^K:

1. layer-wise normalization (optional): g ← g / ‖g‖; a zero gradient stays zero;
2. a fixed random permutation π of the D coordinates and fixed random signs σ ∈ {±1}^D: v_p = σ_p g_π(p);
3. folding: v, zero-padded to a multiple of K, is cut into pieces of K that are summed, c_k = Σ_m v_(mK+k).

π and σ are drawn once per layer from a seeded generator (the caller seeds it by the module's name) and
never stored. Steps 2-3 are a count sketch: coordinate π(p) lands in bin p mod K with sign σ_p, so over the
draw E⟨c(g), c(g')⟩ = ⟨g, g'⟩ (every cross term carries σ_p σ_q, of mean zero), with a variance that falls
like 1/K. With the normalization, ⟨c(g), c(g')⟩ estimates the cosine of the two gradients of that layer, and
a dot product of stored vectors is about a sum of per-layer cosines: an example's loss scale, length and
gradient norm no longer weigh in its scores, which are then bounded by the number of layers (dot) and are
not comparable with unnormalized ones. A layer whose gradient is zero only up to round-off (attention
queries and keys of a sequence whose one loss position sees itself alone) is blown up to a unit vector of
that round-off; an exactly zero gradient (an example without labels) stays zero. The compression ratio is
D / K = d_out·d_in / K per layer.

Unlike a Kronecker projection, which never forms G, this needs G itself: B·d_out·d_in floats per layer and
batch (the hooks form them one layer at a time, in that layer's backward hook, and keep only the K-dim
result), and π and σ of a layer have D entries each (int32 and int8 on the device: 5 bytes per weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def folded_dim(k: int, d_out: int, d_in: int) -> int:
    """K of a layer: k, capped at D = d_out·d_in (folding into more bins than coordinates only pads zeros)."""
    return min(k, d_out * d_in)


@dataclass(frozen=True)
class RapidGrad:
    """The fixed compression of one layer: permutation `perm` (π, [D]), signs `signs` (σ, [D], ±1), K bins."""

    perm: torch.Tensor
    signs: torch.Tensor
    k: int
    normalize: bool = True

    @classmethod
    def draw(cls, numel: int, k: int, generator: torch.Generator, normalize: bool = True) -> "RapidGrad":
        """π then σ, from `generator` (a CPU generator: the same seed redraws the same compression anywhere)."""
        if not 1 <= k <= numel:
            raise ValueError(f"RapidGrad folds {numel} coordinates into k={k} bins; k must be in [1, {numel}]")
        perm = torch.randperm(numel, generator=generator).to(torch.int32 if numel < 2**31 else torch.int64)
        signs = torch.randint(0, 2, (numel,), generator=generator, dtype=torch.int8) * 2 - 1
        return cls(perm, signs, k, normalize)

    @property
    def numel(self) -> int:
        return int(self.perm.shape[0])

    @property
    def ratio(self) -> float:
        """Compression ratio D / K."""
        return self.numel / self.k

    def to(self, device: torch.device | str) -> "RapidGrad":
        return RapidGrad(self.perm.to(device), self.signs.to(device), self.k, self.normalize)

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """Compress the rows of g ([B, D], each a row-major G) to [B, K], in g's dtype."""
        batch, numel = g.shape
        if numel != self.numel:
            raise ValueError(f"gradient rows have {numel} coordinates, this compression was drawn for {self.numel}")
        v = g.index_select(1, self.perm)  # [B, D]: column p is g's π(p)
        v.mul_(self.signs)
        whole = numel - numel % self.k
        c = v[:, :whole].reshape(batch, -1, self.k).sum(dim=1)  # [B, D // K, K] → [B, K]
        if whole < numel:  # the last piece, zero-padded to K
            c[:, : numel - whole] += v[:, whole:]
        if self.normalize:
            # Folding is linear, so dividing the K-dim result equals dividing g; ‖g‖ = ‖v‖ (π and σ keep norms).
            norms = g.norm(dim=1, keepdim=True)  # [B, 1]
            c.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))
        return c
