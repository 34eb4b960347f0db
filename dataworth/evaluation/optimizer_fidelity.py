"""How close the factored optimizer-state correction is to the exact elementwise one, on a small model.

The index corrects gradients by diag(s_out) G diag(s_in), Adafactor's factored form of 1/(√v + ε)
(`dataworth.attribution.optimizer_state`), because the elementwise G / (√V + ε) does not commute with
the Kronecker projection. This module measures what the factored form costs, with full (unprojected)
per-example gradients so that nothing else differs: each query's ranking of the training examples by
⟨corrected g_q, corrected g_i⟩ under both forms, compared by Spearman correlation and top-k overlap, beside
the per-layer relative error of the factored 1/√v. Full gradients are held in memory: tiny models only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dataworth.attribution.gradients import log_example_gradients, query_gradients
from dataworth.attribution.optimizer_state import factored_error, factored_scales, layer_moments, load_second_moments
from dataworth.attribution.projection import Projector, select_modules
from dataworth.config import LoggingConfig
from dataworth.data import Example, pad_token_id
from dataworth.errors import DataError
from dataworth.evaluation.matrices import rank_agreement
from dataworth.queries import EncodedQuery


@dataclass
class CorrectionFidelity:
    """Factored against exact elementwise optimizer-state correction (means over queries)."""

    spearman: float  # rank correlation of each query's scores over all training examples
    topk_overlap: float  # |top-k factored ∩ top-k exact| / k
    uncorrected_spearman: float  # the same for no correction at all, against the exact correction: the scale
    uncorrected_topk_overlap: float
    layer_error: dict[str, float]  # ‖1/(√V+ε) − s_out s_inᵀ‖ / ‖1/(√V+ε)‖ per tracked layer
    k: int

    def as_dict(self) -> dict:
        return {
            "spearman": self.spearman,
            "topk_overlap": self.topk_overlap,
            "uncorrected_spearman": self.uncorrected_spearman,
            "uncorrected_topk_overlap": self.uncorrected_topk_overlap,
            "mean_layer_error": float(np.mean(list(self.layer_error.values()))),
            "k": self.k,
        }


def correction_fidelity(
    model,
    tokenizer,
    examples: list[Example],
    queries: list[EncodedQuery],
    optimizer_state: str,
    logging: LoggingConfig | None = None,
    k: int = 10,
    batch_size: int = 16,
) -> CorrectionFidelity:
    """Compare the factored and the exact elementwise correction on full per-example gradients (see module doc).

    `logging` chooses the tracked layers and the loss (its projection settings are ignored: gradients are full)."""
    if not examples or not queries:
        raise DataError("correction_fidelity needs training examples and queries to rank them for")
    base = (logging or LoggingConfig()).model_copy(
        update={"projection": "identity", "precondition": "none", "optimizer_state": None, "batch_size": batch_size}
    )
    modules = select_modules(model, base.modules, base.exclude_modules)
    state = load_second_moments(optimizer_state, model)
    moments = layer_moments(modules, state)
    exact, factored, errors = [], [], {}
    layout = Projector(modules, base).layout
    for block in layout.blocks:  # in the stored vector's order
        v = moments[block.name]
        exact.append((1.0 / (v.sqrt() + state.eps)).reshape(-1))
        s_in, s_out = factored_scales(v, state.eps)
        factored.append(torch.outer(s_out, s_in).reshape(-1))
        errors[block.name] = factored_error(v, state.eps)
    exact_scale, factored_scale = torch.cat(exact).float(), torch.cat(factored).float()
    train = torch.empty(len(examples), layout.dim, dtype=torch.float32)
    position = {e.example_id: j for j, e in enumerate(examples)}
    for ids, grads in log_example_gradients(model, tokenizer, examples, base, False, None):
        train[[position[i] for i in ids.tolist()]] = grads.float()
    q = query_gradients(model, queries, base, pad_token_id(tokenizer), batch_size, None).float()
    exact_scores = ((q * exact_scale) @ (train * exact_scale).T).numpy()
    rho, overlap = rank_agreement(((q * factored_scale) @ (train * factored_scale).T).numpy(), exact_scores, k)
    rho0, overlap0 = rank_agreement((q @ train.T).numpy(), exact_scores, k)
    return CorrectionFidelity(rho, overlap, rho0, overlap0, errors, k)
