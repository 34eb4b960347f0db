"""Exact table schemas and the checks that hold input tables to them."""

from __future__ import annotations

import pyarrow as pa
import pytest

from storage import SCHEMA_VERSION, IndexStoreError
from storage.schemas import (
    VERSION_KEY,
    artifacts_schema,
    check_stored_schema,
    conform,
    examples_schema,
    gradients_schema,
    queries_schema,
    scores_schema,
    vector_layout,
)


def _fields(schema: pa.Schema) -> list[tuple[str, pa.DataType, bool]]:
    return [(f.name, f.type, f.nullable) for f in schema]


def test_schema_version_is_in_every_schema():
    assert SCHEMA_VERSION == 1
    schemas = (examples_schema(), gradients_schema(4, "float32"), scores_schema(), queries_schema(), artifacts_schema())
    for schema in schemas:
        assert schema.metadata == {VERSION_KEY: b"1"}


def test_examples_schema():
    assert _fields(examples_schema()) == [
        ("example_id", pa.int64(), False),
        ("document_id", pa.string(), False),
        ("chunk_index", pa.int32(), False),
        ("token_start", pa.int32(), False),
        ("token_end", pa.int32(), False),
        ("num_tokens", pa.int32(), False),
        ("text", pa.string(), False),
        ("source", pa.string(), True),
        ("input_ids", pa.list_(pa.int32()), False),
        ("label_mask", pa.list_(pa.bool_()), True),
    ]


@pytest.mark.parametrize(
    "dtype, value_type",
    [("float32", pa.float32()), ("float16", pa.float16()), ("bfloat16", pa.uint16()), ("int8", pa.int8())],
)
def test_gradients_schema(dtype, value_type):
    schema = gradients_schema(12, dtype)
    assert _fields(schema) == [
        ("example_id", pa.int64(), False),
        ("shard", pa.int32(), False),
        ("vector", pa.list_(value_type, 12), False),
        ("sq_norm", pa.float32(), False),
    ] + ([("scale", pa.float32(), False)] if dtype == "int8" else [])
    assert vector_layout(schema) == (12, dtype)


def test_gradients_schema_rejects_bad_dim_and_dtype():
    with pytest.raises(IndexStoreError, match="dim must be a positive int, got 0"):
        gradients_schema(0, "float32")
    with pytest.raises(IndexStoreError, match="'float64' is not supported"):
        gradients_schema(4, "float64")


def test_scores_queries_artifacts_schemas():
    assert _fields(scores_schema()) == [
        ("run_id", pa.string(), False),
        ("query_id", pa.string(), False),
        ("example_id", pa.int64(), False),
        ("score", pa.float64(), False),
        ("rank", pa.int32(), False),
        ("mode", pa.string(), False),
        ("index_version", pa.int64(), False),
    ]
    assert _fields(queries_schema()) == [
        ("run_id", pa.string(), False),
        ("query_id", pa.string(), False),
        ("prompt", pa.string(), False),
        ("completion", pa.string(), False),
        ("generated", pa.bool_(), False),
        ("num_completion_tokens", pa.int32(), False),
    ]
    assert _fields(artifacts_schema()) == [("key", pa.string(), False), ("value", pa.large_binary(), False)]


def test_conform_reorders_and_casts_safely():
    table = pa.table({"value": [b"x"], "key": ["k"]})
    out = conform(table, artifacts_schema(), "artifacts")
    assert out.schema == artifacts_schema() and out.schema.metadata == artifacts_schema().metadata
    assert out.to_pylist() == [{"key": "k", "value": b"x"}]


def test_conform_names_missing_and_extra_columns():
    table = pa.table({"key": ["k"], "blob": [b"x"]})
    with pytest.raises(IndexStoreError, match=r"missing \['value'\], unexpected \['blob'\]"):
        conform(table, artifacts_schema(), "artifacts")


def test_conform_rejects_lossy_cast_and_nulls():
    row = {"run_id": "r", "query_id": "q", "example_id": 1, "score": 0.5, "rank": 2**40, "mode": "dot"}
    row["index_version"] = 1
    with pytest.raises(IndexStoreError, match="column 'rank' has type int64"):
        conform(pa.Table.from_pylist([row]), scores_schema(), "scores")
    row["rank"], row["query_id"] = 0, None
    with pytest.raises(IndexStoreError, match="column 'query_id' has 1 null"):
        conform(pa.Table.from_pylist([row]), scores_schema(), "scores")


def test_check_stored_schema_refuses_foreign_and_other_versions():
    check_stored_schema(scores_schema(), scores_schema(), "scores")
    with pytest.raises(IndexStoreError, match="not written by dataworth.*overwrite=True"):
        check_stored_schema(scores_schema().remove_metadata(), scores_schema(), "scores")
    old = scores_schema().with_metadata({VERSION_KEY: b"0"})
    with pytest.raises(IndexStoreError, match="schema version 0, this dataworth reads version 1"):
        check_stored_schema(old, scores_schema(), "scores")
    other = queries_schema()
    with pytest.raises(IndexStoreError, match="table 'scores' has columns"):
        check_stored_schema(other, scores_schema(), "scores")
