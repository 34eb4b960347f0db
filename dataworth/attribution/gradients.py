"""Per-example projected gradients of training examples and of queries."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from dataworth.attribution.hooks import GradientCollector
from dataworth.attribution.projection import FittedProjections
from dataworth.config import LoggingConfig
from dataworth.data import Example, collate_examples, pad_token_id
from dataworth.queries import EncodedQuery, collate_queries


def log_example_gradients(
    model,
    tokenizer,
    examples: list[Example],
    cfg: LoggingConfig,
    progress: bool = False,
    fitted: FittedProjections | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (example_ids, gradients (n, dim) float32 on CPU) batch by batch.

    Examples are sorted by length inside the call so padding stays small; ids say which is which.
    """
    pad = pad_token_id(tokenizer)
    order = sorted(range(len(examples)), key=lambda i: examples[i].num_tokens)
    with GradientCollector(model, cfg, fitted) as collector:
        bar = tqdm(total=len(examples), desc="log gradients", unit="ex", disable=not progress)
        for start in range(0, len(order), cfg.batch_size):
            batch = [examples[i] for i in order[start : start + cfg.batch_size]]
            input_ids, attention, labels = collate_examples(batch, pad)
            grads, _ = collector.batch_gradients(input_ids, attention, labels)
            yield torch.tensor([e.example_id for e in batch], dtype=torch.long), grads.detach().float().cpu()
            bar.update(len(batch))
        bar.close()


def query_gradients(
    model,
    queries: list[EncodedQuery],
    cfg: LoggingConfig,
    pad_id: int,
    batch_size: int,
    fitted: FittedProjections | None = None,
) -> torch.Tensor:
    """(n_queries, dim) gradients of the completion loss, in the order given."""
    out = []
    with GradientCollector(model, cfg, fitted) as collector:
        for start in range(0, len(queries), batch_size):
            batch = queries[start : start + batch_size]
            input_ids, attention, labels = collate_queries(batch, pad_id)
            grads, _ = collector.batch_gradients(input_ids, attention, labels)
            out.append(grads.detach().cpu())
    return torch.cat(out, dim=0)
