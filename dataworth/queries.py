"""Queries: reading them (JSONL lines {id, prompt, completion?}, checked before any model work)
and encoding them as token ids, completing the ones without a completion greedily."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from dataworth.config import GenerationConfig, QuerySpec
from dataworth.data import pad_token_id


def load_queries(path: str | None, inline: list[QuerySpec] | None = None) -> list[QuerySpec]:
    queries = list(inline or [])
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"queries file {path!r} does not exist")
        for n, line in enumerate(p.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{n} is not valid JSON ({err.msg}); each line must be one JSON object"
                ) from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n} must be a JSON object with 'prompt' (and optionally 'id', 'completion')")
            row.setdefault("id", f"q{n}")
            row = {k: row[k] for k in ("id", "prompt", "completion") if k in row}
            try:
                queries.append(QuerySpec(**{**row, "id": str(row["id"])}))
            except ValidationError as err:
                raise ValueError(
                    f"{path}:{n} is not a valid query: {err.errors()[0]['msg']} ({err.errors()[0]['loc']})"
                ) from err
    if not queries:
        raise ValueError(
            'no queries: give queries inline or a queries_path JSONL file with one {"prompt": ...} per line'
        )
    ids = [q.id for q in queries]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"query ids {sorted(dup)} appear more than once; ids must be unique")
    return queries


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
            raise ValueError(
                f"query {q.id!r} has an empty completion; give text or leave completion out to generate one"
            )
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
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=gen.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        for i, e in enumerate(batch):
            e.completion_ids = _cut_completion(out[i, width:].tolist(), tokenizer, gen)
            if not e.completion_ids:
                raise ValueError(
                    f"the model generated nothing for query {e.id!r} (it stopped at once); give a completion explicitly"
                )
            e.completion = tokenizer.decode(e.completion_ids)
    return encoded
