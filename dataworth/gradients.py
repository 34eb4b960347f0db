"""Per-example projected gradients of training examples and of queries."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .collector import GradientCollector
from .config import GenerationConfig, LoggingConfig, QuerySpec
from .data import Example, collate, pad_token_id
from .projection import FittedProjections


def log_example_gradients(
    model, tokenizer, examples: list[Example], cfg: LoggingConfig, progress: bool = False,
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
            input_ids, attention, labels = collate([e.input_ids for e in batch], pad)
            grads, _ = collector.batch_gradients(input_ids, attention, labels)
            yield torch.tensor([e.example_id for e in batch], dtype=torch.long), grads.detach().float().cpu()
            bar.update(len(batch))
        bar.close()


@dataclass
class EncodedQuery:
    id: str
    prompt: str
    prompt_ids: list[int]
    completion_ids: list[int]
    completion: str
    generated: bool


def _cut_completion(ids: list[int], tokenizer, cfg: GenerationConfig) -> list[int]:
    eos = tokenizer.eos_token_id
    out = []
    for t in ids:
        if eos is not None and t == eos:
            break
        piece = tokenizer.decode([t])
        if out and ((cfg.stop_at_newline and "\n" in piece) or any(s in piece for s in cfg.stop)):
            break
        out.append(t)
    return out


@torch.no_grad()
def encode_queries(
    model, tokenizer, queries: list[QuerySpec], gen: GenerationConfig, max_length: int, batch_size: int = 16
) -> list[EncodedQuery]:
    """Tokenize prompts and completions; queries without a completion are completed greedily.

    The loss later falls on completion tokens only, so the boundary is kept as token ids,
    never re-tokenized from decoded text.
    """
    seen = set()
    encoded: list[EncodedQuery] = []
    for q in queries:
        if q.id in seen:
            raise ValueError(f"query id {q.id!r} appears twice; query ids must be unique")
        seen.add(q.id)
        p_ids = tokenizer(q.prompt, add_special_tokens=True)["input_ids"]
        c_ids = tokenizer(q.completion, add_special_tokens=False)["input_ids"] if q.completion is not None else []
        if q.completion is not None and not c_ids:
            raise ValueError(f"query {q.id!r} has an empty completion; give text or leave completion out to generate one")
        encoded.append(EncodedQuery(q.id, q.prompt, list(p_ids), list(c_ids), q.completion or "", q.completion is None))
    for e in encoded:  # before generating: an over-long prompt would fail deep inside the position embedding
        total = len(e.prompt_ids) + (gen.max_new_tokens if e.generated else len(e.completion_ids))
        if total > max_length:
            what = f"up to {gen.max_new_tokens} generated" if e.generated else f"{len(e.completion_ids)} completion"
            raise ValueError(
                f"query {e.id!r} has {total} tokens, more than the model's context of {max_length} "
                f"({len(e.prompt_ids)} prompt + {what}); shorten its prompt"
            )
    todo = [e for e in encoded if e.generated]
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        width = max(len(e.prompt_ids) for e in batch)
        # Left padding so every prompt ends at the same position for greedy decoding.
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, width - len(e.prompt_ids) :] = torch.tensor(e.prompt_ids)
            mask[i, width - len(e.prompt_ids) :] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=gen.max_new_tokens,
            do_sample=False, pad_token_id=pad,
        )
        for i, e in enumerate(batch):
            e.completion_ids = _cut_completion(out[i, width:].tolist(), tokenizer, gen)
            if not e.completion_ids:
                raise ValueError(
                    f"the model generated nothing for query {e.id!r} (it stopped at once); give a completion explicitly"
                )
            e.completion = tokenizer.decode(e.completion_ids)
    return encoded


def query_gradients(
    model, queries: list[EncodedQuery], cfg: LoggingConfig, pad_id: int, batch_size: int,
    fitted: FittedProjections | None = None,
) -> torch.Tensor:
    """(n_queries, dim) gradients of the completion loss, in the order given."""
    out = []
    with GradientCollector(model, cfg, fitted) as collector:
        for start in range(0, len(queries), batch_size):
            batch = queries[start : start + batch_size]
            seqs = [q.prompt_ids + q.completion_ids for q in batch]
            masks = [[False] * len(q.prompt_ids) + [True] * len(q.completion_ids) for q in batch]
            input_ids, attention, labels = collate(seqs, pad_id, masks)
            grads, _ = collector.batch_gradients(input_ids, attention, labels)
            out.append(grads.detach().cpu())
    return torch.cat(out, dim=0)
