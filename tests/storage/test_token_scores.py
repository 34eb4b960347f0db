"""The token_scores table: its exact schema, and per-run replacement in a real LanceDB directory."""

import pyarrow as pa
import pytest

from storage import IndexStore, IndexStoreError
from storage.schemas import SCHEMA_VERSION, VERSION_KEY, token_scores_schema


def _rows(run_id: str, n: int) -> pa.Table:
    return pa.table(
        {
            "run_id": [run_id] * n,
            "mode": ["dot"] * n,
            "query_id": ["q"] * n,
            "rank": [1] * n,
            "example_id": [7] * n,
            "document_id": ["d7"] * n,
            "side": ["train"] * n,
            "position": list(range(n)),
            "token_id": [40 + i for i in range(n)],
            "token": [f"t{i}" for i in range(n)],
            "score": [0.5] * n,
            "total": [0.5 * n] * n,
        }
    )


def test_token_scores_schema():
    schema = token_scores_schema()
    assert [(f.name, f.type, f.nullable) for f in schema] == [
        ("run_id", pa.string(), False),
        ("mode", pa.string(), False),
        ("query_id", pa.string(), False),
        ("rank", pa.int32(), False),
        ("example_id", pa.int64(), False),
        ("document_id", pa.string(), False),
        ("side", pa.string(), False),
        ("position", pa.int32(), False),
        ("token_id", pa.int64(), False),
        ("token", pa.string(), False),
        ("score", pa.float64(), False),
        ("total", pa.float64(), False),
    ]
    assert schema.metadata[VERSION_KEY] == str(SCHEMA_VERSION).encode()


def test_token_scores_rewrite_per_run(tmp_path):
    store = IndexStore(str(tmp_path / "results"))
    assert store.read_token_scores().num_rows == 0
    store.write_token_scores("a", _rows("a", 3))
    store.write_token_scores("b", _rows("b", 2))
    store.write_token_scores("a", _rows("a", 1))  # a rerun of run a replaces its rows, never run b's
    assert store.read_token_scores("a").num_rows == 1 and store.read_token_scores("b").num_rows == 2
    assert store.read_token_scores().schema == token_scores_schema()
    with pytest.raises(IndexStoreError, match="also carry run_id"):
        store.write_token_scores("a", _rows("b", 1))
    with pytest.raises(IndexStoreError, match="missing"):
        store.write_token_scores("a", _rows("a", 1).drop_columns(["total"]))
    store.drop()  # the table is one of the index's
    assert store.read_token_scores().num_rows == 0
