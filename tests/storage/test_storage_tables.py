"""Table builders: plain Python values in, rows of the exact stored schemas out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from dataworth.data import Example
from storage import IndexStore, examples_table, queries_table, scores_table, write_csv
from storage.schemas import examples_schema, queries_schema, scores_schema


@dataclass
class _Query:
    id: str
    prompt: str
    completion: str
    generated: bool
    completion_ids: list[int]


def test_examples_table_from_examples(tmp_path):
    examples = [Example(0, "d0", 0, 0, 3, [5, 6, 7], "web", [False, False, True]), Example(1, "d0", 1, 3, 4, [8], "")]
    table = examples_table(examples, ["a b c", "d"])
    assert table.schema == examples_schema()
    assert table.to_pylist()[1] == {
        "example_id": 1,
        "document_id": "d0",
        "chunk_index": 1,
        "token_start": 3,
        "token_end": 4,
        "num_tokens": 1,
        "text": "d",
        "source": None,  # an empty source is stored as null
        "input_ids": [8],
        "label_mask": None,
    }
    assert table.column("label_mask").to_pylist() == [[False, False, True], None]
    store = IndexStore(str(tmp_path / "index"))
    store.write_examples(table)
    assert store.read_examples().to_pylist() == table.to_pylist()
    with pytest.raises(ValueError, match="1 texts for 2 examples"):
        examples_table(examples, ["x"])


def test_scores_table_orders_mode_query_rank():
    topk = {
        "dot": (np.array([[3, 1], [2, 0]]), np.array([[0.9, 0.5], [0.8, 0.1]])),
        "cosine": (np.array([[1, 3], [0, 2]]), np.array([[1.0, 0.2], [0.7, 0.3]])),
    }
    table = scores_table("run", ["qa", "qb"], topk, 7)
    assert table.schema == scores_schema()
    rows = [(r["mode"], r["query_id"], r["rank"], r["example_id"], r["score"]) for r in table.to_pylist()]
    assert rows[:4] == [
        ("dot", "qa", 1, 3, 0.9),
        ("dot", "qa", 2, 1, 0.5),
        ("dot", "qb", 1, 2, 0.8),
        ("dot", "qb", 2, 0, 0.1),
    ]
    assert rows[4] == ("cosine", "qa", 1, 1, 1.0)
    assert set(table.column("run_id").to_pylist()) == {"run"} and set(table.column("index_version").to_pylist()) == {7}
    with pytest.raises(ValueError, match=r"\[1 queries, k\]"):
        scores_table("run", ["qa"], topk, 7)


def test_queries_table_and_csv(tmp_path):
    table = queries_table("run", [_Query("q", "p", " c", True, [4, 5])])
    assert table.schema == queries_schema()
    row = {"run_id": "run", "query_id": "q", "prompt": "p", "completion": " c", "generated": True}
    assert table.to_pylist() == [{**row, "num_completion_tokens": 2}]
    write_csv([{"mode": "dot", "rank": 1}], tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines() == ['"mode","rank"', '"dot",1']


def test_bytes_stored_counts_tables_only(tmp_path):
    store = IndexStore(str(tmp_path / "index"))
    store.write_examples(examples_table([Example(0, "d", 0, 0, 1, [1], None)], ["t"]))
    before = store.bytes_stored()
    assert before > 0
    (tmp_path / "index" / "index_config.yaml").write_text("x" * 1000)
    assert store.bytes_stored() == before
