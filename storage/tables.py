"""Arrow tables built from plain Python values, so that no layer above storage handles Arrow schemas."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from storage.schemas import examples_schema, queries_schema, scores_schema


class ExampleRow(Protocol):
    """One training sequence (dataworth.data.Example has these attributes)."""

    example_id: int
    document_id: str
    chunk_index: int
    token_start: int
    token_end: int
    input_ids: list[int]
    source: str | None
    label_mask: list[bool] | None

    @property
    def num_tokens(self) -> int: ...


class QueryRow(Protocol):
    """One attributed query (dataworth.queries.EncodedQuery has these attributes)."""

    id: str
    prompt: str
    completion: str
    generated: bool
    completion_ids: list[int]


def examples_table(examples: Sequence[ExampleRow], texts: Sequence[str]) -> pa.Table:
    """Rows of the examples table; `texts` holds each example's decoded text."""
    if len(texts) != len(examples):
        raise ValueError(f"{len(texts)} texts for {len(examples)} examples; pass one text per example")
    return pa.table(
        {
            "example_id": [e.example_id for e in examples],
            "document_id": [e.document_id for e in examples],
            "chunk_index": [e.chunk_index for e in examples],
            "token_start": [e.token_start for e in examples],
            "token_end": [e.token_end for e in examples],
            "num_tokens": [e.num_tokens for e in examples],
            "text": list(texts),
            "source": [e.source or None for e in examples],
            "input_ids": [list(e.input_ids) for e in examples],
            "label_mask": [None if e.label_mask is None else list(e.label_mask) for e in examples],
        },
        schema=examples_schema(),
    )


def scores_table(
    run_id: str,
    query_ids: Sequence[str],
    topk: Mapping[str, tuple[np.ndarray, np.ndarray]],
    index_version: int,
) -> pa.Table:
    """Rows of the scores table: mode → (example ids [queries, k], scores [queries, k]), best first.

    Rows go mode by mode, then query by query, ranks from 1.
    """
    cols: dict[str, list] = {"query_id": [], "example_id": [], "score": [], "rank": [], "mode": []}
    for mode, (ids, scores) in topk.items():
        ids, scores = np.asarray(ids), np.asarray(scores)
        if ids.shape != scores.shape or ids.ndim != 2 or ids.shape[0] != len(query_ids):
            raise ValueError(
                f"mode {mode!r}: ids {ids.shape} and scores {scores.shape} must both be [{len(query_ids)} queries, k]"
            )
        for qi, qid in enumerate(query_ids):
            k = ids.shape[1]
            cols["query_id"] += [qid] * k
            cols["example_id"] += ids[qi].tolist()
            cols["score"] += scores[qi].tolist()
            cols["rank"] += list(range(1, k + 1))
            cols["mode"] += [mode] * k
    n = len(cols["rank"])
    return pa.table({"run_id": [run_id] * n, **cols, "index_version": [index_version] * n}, schema=scores_schema())


def queries_table(run_id: str, queries: Sequence[QueryRow]) -> pa.Table:
    """Rows of the queries table: each query with the completion actually attributed."""
    return pa.table(
        {
            "run_id": [run_id] * len(queries),
            "query_id": [q.id for q in queries],
            "prompt": [q.prompt for q in queries],
            "completion": [q.completion for q in queries],
            "generated": [q.generated for q in queries],
            "num_completion_tokens": [len(q.completion_ids) for q in queries],
        },
        schema=queries_schema(),
    )


def write_csv(rows: Sequence[Mapping[str, object]], path: str | Path) -> None:
    """Write dict rows (columns from their keys) as CSV."""
    pacsv.write_csv(pa.Table.from_pylist(list(rows)), str(path))
