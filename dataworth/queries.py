"""Queries: reading them (JSONL lines {id, prompt, completion?}, checked before any model work)
and encoding them as token ids, completing the ones without a completion greedily."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from dataworth.config import GenerationConfig, QuerySpec
from dataworth.data import assistant_span, collate, pad_token_id, render_chat
from dataworth.errors import ConfigError, QueryError
from dataworth.model import context_length


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
                raise QueryError(
                    f"{path}:{n} is not valid JSON ({err.msg}); each line must be one JSON object"
                ) from err
            if not isinstance(row, dict):
                raise QueryError(
                    f"{path}:{n} must be a JSON object with 'prompt' (and optionally 'id', 'completion') or 'messages'"
                )
            row.setdefault("id", f"q{n}")
            row = {k: row[k] for k in ("id", "prompt", "completion", "messages") if k in row}
            try:
                queries.append(QuerySpec(**{**row, "id": str(row["id"])}))
            except ValidationError as err:
                raise QueryError(
                    f"{path}:{n} is not a valid query: {err.errors()[0]['msg']} ({err.errors()[0]['loc']})"
                ) from err
    if not queries:
        raise QueryError(
            'no queries: give queries inline or a queries_path JSONL file with one {"prompt": ...} per line'
        )
    ids = [q.id for q in queries]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise QueryError(f"query ids {sorted(dup)} appear more than once; ids must be unique")
    return queries


@dataclass
class EncodedQuery:
    id: str
    prompt: str
    prompt_ids: list[int]
    completion_ids: list[int]
    completion: str
    generated: bool

    @property
    def input_ids(self) -> list[int]:
        """Prompt then completion, the sequence the query's loss is taken on."""
        return self.prompt_ids + self.completion_ids

    @property
    def label_mask(self) -> list[bool]:
        """True on the completion tokens: the loss falls on them only."""
        return [False] * len(self.prompt_ids) + [True] * len(self.completion_ids)


def collate_queries(queries: list[EncodedQuery], pad_id: int):
    """Right-padded (input_ids, attention_mask, labels) of a batch of queries; labels on completion tokens only."""
    return collate([q.input_ids for q in queries], pad_id, [q.label_mask for q in queries])


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
def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A query prompt's token ids, with the tokenizer's special tokens unless the text begins with its BOS token
    already (a chat template's rendering): a rendered chat prompt, stored as text, encodes the same way again."""
    bos = getattr(tokenizer, "bos_token", None)
    special = not (isinstance(bos, str) and bos and prompt.startswith(bos))
    return list(tokenizer(prompt, add_special_tokens=special)["input_ids"])


def render_chat_query(tokenizer, q: QuerySpec) -> tuple[str, str | None]:
    """(prompt text, completion text or None: to generate) of a chat query, rendered by the tokenizer's chat
    template: a last assistant message is the completion, its turn as the template writes it (the text the
    rendering of the whole adds to that of the messages before it with the generation prompt); otherwise the
    prompt is the whole chat with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise QueryError(
            f"query {q.id!r} is a chat (messages), and the tokenizer has no chat template to render it",
            fix="use the chat model's tokenizer (its tokenizer_config.json holds the template), or give the query "
            "as prompt and completion text",
        )
    messages = [dict(m) for m in q.messages]
    if messages[-1]["role"] != "assistant":
        return render_chat(tokenizer, messages, generation=True), None
    whole = render_chat(tokenizer, messages)
    span = assistant_span(tokenizer, messages, len(messages) - 1, whole)
    if span is None or span[0] == span[1]:
        raise QueryError(
            f"query {q.id!r}: the chat template renders the chat as something other than its first messages followed "
            "by the reply, so the reply cannot be found",
            fix="give the query as prompt and completion text",
        )
    return whole[: span[0]], whole[span[0] :]


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
            raise QueryError(f"query id {q.id!r} appears twice; query ids must be unique")
        seen.add(q.id)
        prompt, completion = render_chat_query(tokenizer, q) if q.messages is not None else (q.prompt, q.completion)
        p_ids = encode_prompt(tokenizer, prompt)
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] if completion is not None else []
        if completion is not None and not c_ids:
            raise QueryError(
                f"query {q.id!r} has an empty completion; give text or leave completion out to generate one"
            )
        encoded.append(EncodedQuery(q.id, prompt, list(p_ids), list(c_ids), completion or "", completion is None))
    for e in encoded:  # before generating: an over-long prompt would fail deep inside the position embedding
        total = len(e.prompt_ids) + (gen.max_new_tokens if e.generated else len(e.completion_ids))
        if total > max_length:
            what = f"up to {gen.max_new_tokens} generated" if e.generated else f"{len(e.completion_ids)} completion"
            raise QueryError(
                f"query {e.id!r} has {total} tokens, more than the model's context of {max_length} "
                f"({len(e.prompt_ids)} prompt + {what}); shorten its prompt"
            )
    todo = [e for e in encoded if e.generated]
    generated = greedy_generate(
        model, [e.prompt_ids for e in todo], gen.max_new_tokens, pad_token_id(tokenizer), batch_size
    )
    for e, new_ids in zip(todo, generated):
        e.completion_ids = _cut_completion(new_ids, tokenizer, gen)
        if not e.completion_ids:
            raise QueryError(
                f"the model generated nothing for query {e.id!r} (it stopped at once); give a completion explicitly"
            )
        e.completion = tokenizer.decode(e.completion_ids)
    return encoded


@torch.no_grad()
def greedy_generate(
    model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, batch_size: int = 16
) -> list[list[int]]:
    """The greedy continuation (new token ids) of each prompt, in the order given.

    Prompts are left-padded in batches so every prompt ends at the same position. Generation
    stops at the model's end-of-text token (the rest of that row is `pad_id`, for the caller
    to cut) and never runs past the model's context. Dropout is off while generating; the
    model's train/eval mode is restored.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    device = next(model.parameters()).device
    context = context_length(model)
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            width = max(len(p) for p in batch)
            steps = max_new_tokens if context is None else min(max_new_tokens, context - width)
            if steps <= 0:
                out.extend([] for _ in batch)
                continue
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, p in enumerate(batch):
                ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[i, width - len(p) :] = 1
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=steps,
                do_sample=False,
                pad_token_id=pad_id,
            )  # [B, width + ≤steps]
            out.extend(row.tolist() for row in generated[:, width:])
    finally:
        model.train(was_training)
    return out
