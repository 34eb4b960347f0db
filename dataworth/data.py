"""Reading a corpus, splitting documents into examples, and batching.

An example is a chunk of at most `max_length` tokens of one document; it keeps its
document id and token offsets so scores can be traced back to the text.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dataworth.config import DataConfig
from dataworth.errors import DataError

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


@dataclass
class Documents:
    texts: list[str]
    ids: list[str]
    sources: list[str]
    # With data.prompt_column: each document's prompt, whose tokens come first and carry no loss.
    prompts: list[str] | None = None
    # With data.conversation_column: each document's messages ({"role", "content"}), rendered by the tokenizer's chat
    # template; the loss falls on the assistant's turns only.
    conversations: list[list[dict]] | None = None


@dataclass
class Example:
    example_id: int
    document_id: str
    chunk_index: int
    token_start: int
    token_end: int
    input_ids: list[int] = field(repr=False)
    source: str = ""
    # True where a token's label counts (the loss falls on it), False on a prompt's or a user turn's tokens
    # (data.prompt_column, data.conversation_column); None: every token's label counts.
    label_mask: list[bool] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def _data_files(path: str) -> list[str]:
    """The local data files a dataset path names (a file, a glob, or a directory's files); [] for a hub name."""
    if os.path.isdir(path):
        return sorted(f for ext in _FILE_BUILDERS for f in glob.glob(os.path.join(path, f"*{ext}")))
    return sorted(glob.glob(path)) if any(c in path for c in "*?[") else ([path] if os.path.isfile(path) else [])


def _load_dataset(cfg: DataConfig):
    import datasets

    path = cfg.dataset
    if os.path.isdir(path) and (
        Path(path, "dataset_info.json").exists()
        or Path(path, "state.json").exists()
        or Path(path, "dataset_dict.json").exists()
    ):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise DataError(f"saved dataset {path!r} has splits {list(ds)}, not {cfg.split!r}; set split")
            ds = ds[cfg.split]
        return ds
    files = _data_files(path)
    if os.path.isdir(path):
        if not files:
            raise DataError(f"directory {path!r} holds no saved dataset and no {sorted(_FILE_BUILDERS)} files")
    if files:
        exts = {Path(f).suffix for f in files}
        if len(exts) != 1 or next(iter(exts)) not in _FILE_BUILDERS:
            raise DataError(f"data files {files[:3]} must share one extension among {sorted(_FILE_BUILDERS)}")
        for f in files:
            if os.path.getsize(f) == 0:
                raise DataError(f"data file {f!r} is empty", fix="remove it, or give a file that holds documents")
        try:
            return datasets.load_dataset(_FILE_BUILDERS[exts.pop()], data_files=files, split="train")
        except Exception as err:  # datasets' own errors name neither the file nor the line: find them
            raise unreadable_files(files, err) from err
    if any(c in path for c in "*?["):
        raise DataError(
            f"no data files match {path!r}",
            fix="add .jsonl/.json/.csv/.parquet/.txt files there (each run indexes the files present then), or "
            "correct the pattern",
        )
    if path.startswith((".", "/", "~")) or path.endswith(tuple(_FILE_BUILDERS)):
        raise DataError(
            f"dataset path {path!r} does not exist",
            fix="give a local file, glob or directory of .jsonl/.json/.csv/.parquet/.txt files, or a hub name",
        )
    return datasets.load_dataset(path, cfg.subset, split=cfg.split)


def unreadable_files(files: list[str], err: BaseException) -> DataError:
    """A DataError that names the file and line `datasets` could not read (the first undecodable or
    unparsable line of the first bad file), falling back to the file list and datasets' own message."""
    for f in files:
        bad = _first_bad_line(f)
        if bad is not None:
            line, problem, fix = bad
            return DataError(f"data file {f!r}, line {line}: {problem}", fix=fix)
    cause = err.__cause__ or err.__context__
    detail = f"{type(err).__name__}: {err}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
    return DataError(
        f"cannot read data files {files[:3]}{' …' if len(files) > 3 else ''}: {detail}",
        fix="check that every file is valid for its extension (.jsonl: one JSON object per line)",
    )


def _first_bad_line(path: str) -> tuple[int, str, str] | None:
    """(line number, what is wrong, the fix) of the first line of a text data file that is not UTF-8, or, for
    .jsonl/.json files holding one object per line, not a JSON object; None when every line reads."""
    suffix = Path(path).suffix
    if suffix == ".parquet":
        return None
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (
                    n,
                    f"bytes {raw[e.start : e.end]!r} at byte {e.start} of the line are not UTF-8",
                    "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
                )
            if suffix in (".jsonl", ".json") and text.strip():
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as e:
                    if suffix == ".json" and n == 1:
                        return None  # a JSON document over several lines, not JSON Lines: datasets' message stands
                    return n, f"not valid JSON ({e.msg}, column {e.colno})", "fix or remove that line"
                if not isinstance(value, dict):
                    return n, f"holds a JSON {type(value).__name__}, not an object", "write one JSON object per line"
    return None


def load_documents(cfg: DataConfig) -> Documents:
    """Documents from a hub name, a saved dataset, or local files; checked before any model work."""
    ds = _load_dataset(cfg)
    columns = list(ds.column_names)
    chats = cfg.conversation_column
    for label, col in (
        ("conversation_column" if chats else "text_column", chats or cfg.text_column),
        ("id_column", cfg.id_column),
        ("source_column", cfg.source_column),
        ("prompt_column", cfg.prompt_column),
    ):
        if col is not None and col not in columns:
            raise DataError(f"dataset {cfg.dataset!r} has no column {col!r} (columns: {columns}); set {label}")
    if cfg.max_documents is not None:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    if len(ds) == 0:
        raise DataError(f"dataset {cfg.dataset!r} (split {cfg.split!r}) is empty")
    try:  # JSON text is decoded only here: a file that is not UTF-8 fails now, not when datasets read it
        texts = list(ds[chats or cfg.text_column])  # a lazy column in datasets 4: decode it here
        ids = [str(v) for v in ds[cfg.id_column]] if cfg.id_column else [str(i) for i in range(len(ds))]
        sources = [str(v) for v in ds[cfg.source_column]] if cfg.source_column else [""] * len(ds)
        prompts = list(ds[cfg.prompt_column]) if cfg.prompt_column else None
    except UnicodeDecodeError as err:
        raise unreadable_files(_data_files(cfg.dataset), err) from err
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"id_column {cfg.id_column!r} repeats the id {dup!r}; document ids must be unique")
    for i, p in enumerate(prompts or []):
        if p is not None and not isinstance(p, str):
            raise DataError(
                f"document {ids[i]!r} (row {i}): prompt_column {cfg.prompt_column!r} holds {type(p).__name__}, not text"
            )
    if chats:
        return conversations_of(cfg, texts, ids, sources)
    keep = []
    for i, t in enumerate(texts):
        # A missing value (an empty CSV cell, a JSON null) is an empty document, not a type error.
        if t is not None and not isinstance(t, str):
            chat = isinstance(t, list) and all(isinstance(m, dict) and "role" in m for m in t)
            raise DataError(
                f"document {ids[i]!r} (row {i}): {cfg.text_column!r} holds {type(t).__name__}, not text",
                fix=f"it holds chat messages: set conversation_column={cfg.text_column!r} (--conversation-column)"
                if chat
                else None,
            )
        if t is None or not t.strip():
            if not cfg.skip_empty:
                raise DataError(
                    f"document {ids[i]!r} (row {i}) has empty text; remove it or set skip_empty=True (--skip-empty)"
                )
            continue
        keep.append(i)
    if not keep:
        raise DataError(f"every document of {cfg.dataset!r} is empty")
    picked = [prompts[i] or "" for i in keep] if prompts is not None else None
    return Documents([texts[i] for i in keep], [ids[i] for i in keep], [sources[i] for i in keep], picked)


def conversations_of(cfg: DataConfig, rows: list, ids: list[str], sources: list[str]) -> Documents:
    """The conversation_column's rows as Documents, each checked to be a list of {role, content} messages with
    an assistant turn (without one a row has no loss: an error, or dropped with skip_empty)."""
    keep = []
    for i, row in enumerate(rows):
        where = f"document {ids[i]!r} (row {i}): conversation_column {cfg.conversation_column!r}"
        if not isinstance(row, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in row
        ):
            raise DataError(
                f"{where} must be a list of {{'role': str, 'content': str}} messages, got {str(row)[:120]}",
                fix='write each conversation as [{"role": "user", "content": ...}, '
                '{"role": "assistant", "content": ...}]',
            )
        if not any(m["role"] == "assistant" and m["content"].strip() for m in row):
            if not cfg.skip_empty:
                raise DataError(
                    f"{where} has no assistant turn with text, so no token of loss; remove it or set skip_empty=True "
                    "(--skip-empty)"
                )
            continue
        keep.append(i)
    if not keep:
        raise DataError(f"no conversation of {cfg.dataset!r} has an assistant turn")
    chats = [[{"role": m["role"], "content": m["content"]} for m in rows[i]] for i in keep]
    texts = ["\n".join(f"{m['role']}: {m['content']}" for m in chat) for chat in chats]
    return Documents(texts, [ids[i] for i in keep], [sources[i] for i in keep], conversations=chats)


def chunk_documents(docs: Documents, tokenizer, max_length: int, add_eos: bool = True) -> list[Example]:
    """Tokenize each document once and cut it into consecutive chunks of ≤ max_length tokens.

    A document with a prompt (data.prompt_column) is the prompt's tokens (with the tokenizer's special tokens) then
    the text's (without), as a query's prompt and completion are encoded; the prompt tokens' labels are masked
    (Example.label_mask). A prompt must leave room in the first chunk for a token of loss. A conversation
    (data.conversation_column) is its chat-template rendering, the loss on the assistant's turns (`encode_chat`)."""
    examples: list[Example] = []
    eos = tokenizer.eos_token_id
    masks: list[list[bool] | None]
    if docs.conversations is not None:
        encoded, masks = zip(*(encode_chat(tokenizer, m, d) for m, d in zip(docs.conversations, docs.ids)))
        add_eos = False  # the template ends each turn its own way
    elif docs.prompts is None:
        encoded = tokenizer(docs.texts, add_special_tokens=True)["input_ids"]
        masks = [None] * len(encoded)
    else:
        heads = tokenizer(docs.prompts, add_special_tokens=True)["input_ids"]
        tails = tokenizer(docs.texts, add_special_tokens=False)["input_ids"]
        encoded = [list(h) + list(t) for h, t in zip(heads, tails)]
        masks = [[False] * len(h) + [True] * len(t) for h, t in zip(heads, tails)]
        for doc_id, head in zip(docs.ids, heads):
            if len(head) >= max_length:
                raise DataError(
                    f"document {doc_id!r} has a prompt of {len(head)} tokens, as long as an example "
                    f"(max_length {max_length}): its text would be cut from the prompt it answers",
                    fix="raise data.max_length (--max-length), or shorten or drop that document's prompt",
                )
    for doc_id, source, ids, mask in zip(docs.ids, docs.sources, encoded, masks):
        ids = list(ids)
        if add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            mask = None if mask is None else [*mask, True]
        for c, start in enumerate(range(0, len(ids), max_length)):
            chunk = ids[start : start + max_length]
            part = None if mask is None else mask[start : start + max_length]
            part = None if part is None or all(part) else part  # every label counts: no mask
            examples.append(Example(len(examples), doc_id, c, start, start + len(chunk), chunk, source, part))
    return examples


def render_chat(tokenizer, messages: list[dict], generation: bool = False) -> str:
    """The chat template's text of `messages` (with the generation prompt after them when `generation`); ''
    for no message."""
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation)


def assistant_span(tokenizer, messages: list[dict], i: int, full: str) -> tuple[int, int] | None:
    """The characters of `full` (the rendering of all `messages`) that message i, an assistant turn, adds: from
    the end of the rendering of the messages before it with the generation prompt to the end of the rendering up
    to it. None when those renderings are not prefixes of one another and of `full` (such a template's turns
    cannot be found by rendering)."""
    before, after = render_chat(tokenizer, messages[:i], generation=True), render_chat(tokenizer, messages[: i + 1])
    if not (after.startswith(before) and full.startswith(after)):
        return None
    return len(before), len(after)


def encode_chat(tokenizer, messages: list[dict], doc_id: str = "") -> tuple[list[int], list[bool]]:
    """(token ids, label mask) of a conversation rendered by the tokenizer's chat template: True on the tokens of
    each assistant turn as the template renders it (its content and the end of its turn, not the header the
    template adds before it), False elsewhere, as supervised fine-tuning on the assistant's turns takes the loss.

    A turn's span is the text the rendering of messages[:i+1] adds to that of messages[:i] with the generation
    prompt; a template whose rendering of a conversation does not begin with the rendering of its first turns
    cannot be split so, and is an error."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"document {doc_id!r} is a conversation, and the tokenizer has no chat template to render it",
            fix="use the chat model's tokenizer (its tokenizer_config.json holds the template) or set "
            "model.tokenizer to one that has it; or give the turns as prompt_column and text_column",
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"document {doc_id!r}: splitting a conversation into turns needs a fast tokenizer (character offsets)",
            fix="load the model's tokenizer.json (a fast tokenizer), or give the turns as prompt_column, text_column",
        )

    full = render_chat(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = assistant_span(tokenizer, messages, i, full)
        if span is None:
            raise DataError(
                f"document {doc_id!r}: the chat template renders the conversation's first {i + 1} messages as "
                "something other than the start of the whole conversation, so its assistant turns cannot be found",
                fix="give the turns as prompt_column and text_column instead of conversation_column",
            )
        spans.append(span)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a <= lo < b for a, b in spans) for lo, _ in enc["offset_mapping"]]
    if not any(mask):
        raise DataError(
            f"document {doc_id!r}: no token of its assistant turns survives tokenization; it has nothing to learn",
            fix="drop it, or set skip_empty=True (--skip-empty) to drop conversations without assistant turns",
        )
    return list(enc["input_ids"]), mask


def collate_examples(examples: list[Example], pad_id: int):
    """collate() of examples' tokens, with labels masked where Example.label_mask is False."""
    return collate([e.input_ids for e in examples], pad_id, [e.label_mask for e in examples])


def pad_token_id(source) -> int:
    """The id to pad with, read from a tokenizer or a model config: its pad token, else its eos token, else 0.

    Padding is masked out of attention and labels, so any valid id works. A config's ids are
    checked against its vocabulary (a tokenizer's added tokens may lie past `vocab_size`).
    """
    vocab = None if hasattr(source, "convert_tokens_to_ids") else getattr(source, "vocab_size", None)
    for tid in (getattr(source, "pad_token_id", None), getattr(source, "eos_token_id", None)):
        if isinstance(tid, int) and tid >= 0 and (not isinstance(vocab, int) or tid < vocab):
            return tid
    return 0


def collate(sequences: list[list[int]], pad_id: int, label_masks: list[list[bool]] | None = None):
    """Right-padded (input_ids, attention_mask, labels); labels are -100 on padding and masked tokens (a mask of
    None: every token's label counts)."""
    width = max(len(s) for s in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, seq in enumerate(sequences):
        t = torch.tensor(seq, dtype=torch.long)
        input_ids[i, : len(seq)] = t
        attention[i, : len(seq)] = 1
        lab = t.clone()
        if label_masks is not None and label_masks[i] is not None:
            lab[~torch.tensor(label_masks[i], dtype=torch.bool)] = -100
        labels[i, : len(seq)] = lab
    return input_ids, attention, labels
