"""The next-token loss, defined once: per-token losses with label masking, and the reductions on top.

Labels follow Hugging Face's convention: `labels[:, t]` is the token at position t, or -100
where it does not count (padding, a query's prompt); the logits at position t predict
`labels[:, t + 1]`. Half-precision logits are upcast to float32 before the softmax: a bf16
log-softmax over a large vocabulary keeps two or three significant digits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataworth.errors import ConfigError

IGNORE_INDEX = -100
_HALF = (torch.float16, torch.bfloat16)


def upcast(logits: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`logits` in `dtype` when given, else float16/bfloat16 logits in float32 and others unchanged."""
    if dtype is not None:
        return logits.to(dtype)
    return logits.float() if logits.dtype in _HALF else logits


def token_losses(logits: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(batch, time) next-token NLL at each position; 0 where the next label is ignored and at the last position.

    `dtype` overrides the upcast (float64 for sums of many log-probs that are later subtracted).
    """
    # Shift the targets left rather than the logits right, and keep the vocabulary as the last dim:
    # the softmax then runs over contiguous rows. A (batch, vocab, time) layout made the softmax
    # two thirds of a GPT-2-small logging step on an H100.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    logits = upcast(logits, dtype)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )  # [B·T, V] → [B·T]
    return nll.view(targets.shape)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """(batch,) next-token loss per sequence, summed or averaged over its counted tokens (0 when none count)."""
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"loss reduction {reduction!r} is not 'sum' or 'mean'")
    total = token_losses(logits, labels).sum(dim=1)
    if reduction == "mean":
        total = total / (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return total


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch,) float64 log p of each sequence's counted tokens given what precedes them.

    float64 before the softmax: a sum of many log-probs, and the after − before differences
    of tail patching, must not drown in rounding.
    """
    return -token_losses(logits, labels, torch.float64).sum(dim=1)


def mean_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Scalar mean next-token loss over every counted token of the batch: the training loss.

    It shifts the logits and lets cross_entropy average, unlike `token_losses`: the models
    dataworth trains (the demo's among them) were trained with this order of operations, and
    a change of summation order would change their weights in the last bits.
    """
    logits = upcast(logits[:, :-1])
    targets = labels[:, 1:]
    if not bool((targets != IGNORE_INDEX).any()):
        # A batch of one-token sequences has nothing to predict; a zero loss keeps the step (and
        # the schedule) in place instead of a NaN from an empty mean.
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
