"""Tail-patch (TrackStar, Chang et al. 2024): one optimizer step on one training example,
then the change in each query's completion log-probability; and the completion
log-probabilities it is measured with."""

from __future__ import annotations

from typing import Literal

import torch
from tqdm.auto import tqdm

from dataworth.data import collate
from dataworth.errors import ConfigError, DataError, ModelError, QueryError
from dataworth.losses import per_example_loss, sequence_log_probs
from dataworth.model import context_length
from dataworth.queries import EncodedQuery, collate_queries
from dataworth.training import check_sequences


def _check_queries(queries: list[EncodedQuery], model) -> None:
    if not queries:
        raise QueryError("queries is empty: pass the encoded queries (dataworth.queries.encode_queries)")
    for q in queries:
        if not q.completion_ids:
            raise QueryError(
                f"query {q.id!r} has no completion tokens; "
                "encode it with a completion (or let encode_queries generate one)"
            )
    check_sequences(
        [q.input_ids for q in queries],
        model.config.vocab_size,
        context_length(model),
        "query",
    )


def _log_probs(model, queries: list[EncodedQuery], pad_id: int, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(queries), batch_size):
        batch = queries[start : start + batch_size]
        input_ids, attention, labels = collate_queries(batch, pad_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        out.append(sequence_log_probs(logits, labels.to(device)).cpu())
    return torch.cat(out)


@torch.no_grad()
def completion_log_probs(model, queries: list[EncodedQuery], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """(n_queries,) float64: log p(completion | prompt), summed over the completion's tokens.

    Right padding, so a query's positions and result do not depend on its batch mates.
    Dropout is off while measuring; the model's train/eval mode is restored.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    _check_queries(queries, model)
    was_training = model.training
    model.eval()
    try:
        return _log_probs(model, queries, pad_id, batch_size)
    finally:
        model.train(was_training)


def _trainable(model) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError("the model has no parameter with requires_grad=True; unfreeze the weights to tail-patch")
    return params


def _patch_step(
    model, params, example_ids: list[int], pad_id: int, lr: float, optimizer: str, precondition=None
) -> None:
    device = params[0].device
    input_ids, attention, labels = collate([example_ids], pad_id)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
    loss = per_example_loss(logits, labels.to(device), "mean").sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    if optimizer == "state":
        # The training optimizer's own step without its momentum: Adam's update of this example's gradient under
        # the second moment at the end of training, Δθ = -lr · g / (√v̂ + ε) (`precondition` = 1/(√v̂ + ε)).
        with torch.no_grad():
            for p, g, scale in zip(params, grads, precondition):
                if g is not None:
                    p.sub_(lr * g * scale)
        return
    if optimizer == "normalized":
        # A step of relative size lr: ‖Δθ‖ = lr · ‖θ‖ along −g. Like Adafactor's relative step (TrackStar's
        # optimizer), it does not depend on the model's or the example's gradient scale.
        g_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None))
        if g_norm == 0:
            return
        w_norm = torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params))
        lr = float(lr * w_norm / g_norm)
    # A fresh optimizer per candidate: the step must depend on this example alone. Adam's first
    # step from zero state is lr · g / (|g| + eps), i.e. close to lr · sign(g).
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    for p in params:
        p.grad = None


def _state_precondition(model, params, second_moments) -> list[torch.Tensor]:
    """1/(√v̂ + ε) per trainable parameter, from the saved optimizer state."""
    if second_moments is None:
        raise ConfigError(
            "tail-patch optimizer 'state' needs the training optimizer's saved state: pass second_moments "
            "(dataworth.attribution.optimizer_state.load_second_moments), or choose optimizer 'sgd'"
        )
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for p in params:
        v = second_moments.moments.get(names[id(p)])
        if v is None or tuple(v.shape) != tuple(p.shape):
            raise ModelError(
                f"the optimizer state has no second moment of shape {tuple(p.shape)} for {names[id(p)]!r}: it was "
                "saved for another model; give the state of the checkpoint being patched"
            )
        out.append((1.0 / (v.sqrt() + second_moments.eps)).to(device=p.device, dtype=p.dtype))
    return out


def tail_patch_scores(
    model,
    candidate_sequences: list[list[int]],
    queries: list[EncodedQuery],
    pad_id: int,
    lr: float = 1e-3,
    optimizer: Literal["sgd", "adam", "normalized", "state"] = "sgd",
    batch_size: int = 16,
    progress: bool = False,
    second_moments=None,
) -> torch.Tensor:
    """(n_queries, n_candidates) float64 tail-patch scores (TrackStar, Chang et al. 2024).

    Column j: one optimizer step on candidate j alone (mean token loss), then the change
    in each query's completion log-probability, after − before. With SGD and a small lr
    this is ≈ lr · ∇loss_q · ∇loss_j, so positive means the example teaches the completion;
    "normalized" is SGD with the step length fixed to lr · ‖θ‖ (lr is then a relative step); "state" is the
    step of the optimizer that trained the model, from its saved state (`second_moments`, a
    `dataworth.attribution.optimizer_state.SecondMoments`): Δθ = -lr · g / (√v̂ + ε) with v̂ its bias-corrected
    second moment and no momentum, so the step depends on this example alone (give lr the final learning rate
    of training).
    Dropout is off for the step and the measurements. The weights (and any .grad) are
    restored exactly after every candidate.
    """
    if lr <= 0:
        raise ConfigError(f"lr={lr} must be positive (TrackStar uses the final learning rate of training)")
    if optimizer not in ("sgd", "adam", "normalized", "state"):
        raise ConfigError(f"optimizer={optimizer!r} is not one of 'sgd', 'adam', 'normalized', 'state'")
    if not candidate_sequences:
        raise DataError("candidate_sequences is empty: pass the token ids of the training examples to patch with")
    _check_queries(queries, model)
    check_sequences(candidate_sequences, model.config.vocab_size, context_length(model), "candidate")
    params = _trainable(model)
    precondition = _state_precondition(model, params, second_moments) if optimizer == "state" else None
    was_training = model.training
    saved_grads = [p.grad for p in params]
    # Snapshot once, restore after every candidate: copy_ writes the very same values back, so
    # the restored model is bit-identical (tied weights are one Parameter, copied once).
    with torch.no_grad():
        snapshot = [p.detach().clone() for p in params]
    model.eval()
    scores = torch.empty((len(queries), len(candidate_sequences)), dtype=torch.float64)
    bar = None
    if progress:
        bar = tqdm(total=len(candidate_sequences), desc="tail patch", unit="ex")
    try:
        with torch.no_grad():
            before = _log_probs(model, queries, pad_id, batch_size)
        for j, seq in enumerate(candidate_sequences):
            try:
                with torch.enable_grad():
                    _patch_step(model, params, seq, pad_id, lr, optimizer, precondition)
                with torch.no_grad():
                    scores[:, j] = _log_probs(model, queries, pad_id, batch_size) - before
            finally:
                with torch.no_grad():
                    for p, s in zip(params, snapshot):
                        p.copy_(s)
            if bar is not None:
                bar.update(1)
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        model.train(was_training)
        if bar is not None:
            bar.close()
    return scores


def tail_patch(
    model,
    example_ids: list[int],
    queries: list[EncodedQuery],
    pad_id: int,
    lr: float = 1e-3,
    optimizer: Literal["sgd", "adam", "normalized", "state"] = "sgd",
    batch_size: int = 16,
    second_moments=None,
) -> torch.Tensor:
    """(n_queries,) float64: change in each query's completion log-probability after one
    optimizer step on the single training sequence `example_ids`; weights restored exactly."""
    if len(example_ids) == 0 or isinstance(example_ids[0], (list, tuple)):
        raise DataError(
            "example_ids must be one non-empty training sequence (a list of token ids); "
            "use tail_patch_scores for several candidates"
        )
    return tail_patch_scores(
        model, [example_ids], queries, pad_id, lr, optimizer, batch_size, second_moments=second_moments
    )[:, 0]
