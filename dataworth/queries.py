"""Reading queries: JSONL lines {id, prompt, completion?}, checked before any model work."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from .config import QuerySpec


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
                raise ValueError(f"{path}:{n} is not valid JSON ({err.msg}); each line must be one JSON object") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n} must be a JSON object with 'prompt' (and optionally 'id', 'completion')")
            row.setdefault("id", f"q{n}")
            row = {k: row[k] for k in ("id", "prompt", "completion") if k in row}
            try:
                queries.append(QuerySpec(**{**row, "id": str(row["id"])}))
            except ValidationError as err:
                raise ValueError(f"{path}:{n} is not a valid query: {err.errors()[0]['msg']} ({err.errors()[0]['loc']})") from err
    if not queries:
        raise ValueError("no queries: give queries inline or a queries_path JSONL file with one {\"prompt\": ...} per line")
    ids = [q.id for q in queries]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"query ids {sorted(dup)} appear more than once; ids must be unique")
    return queries
