"""Arrow schemas of every index table, and the checks that hold data and tables to them.

The schema version lives in each table's schema metadata, so a table written by another
version of dataworth (or by something else entirely) is recognised before it is misread.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from storage.errors import REBUILD_HINT, IndexStoreError

SCHEMA_VERSION = 1
VERSION_KEY = b"dataworth.schema_version"
# Arrow value type of the vector column per storage dtype. bfloat16 has no Arrow type: its 16 bits are kept as
# uint16 (the upper half of the float32 bits, rounded to nearest even). int8 rows carry a float32 `scale` column:
# a row is stored as round(g / scale) with scale = max|g| / 127. Each value type stands for one dtype only.
VECTOR_DTYPES = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16(), "int8": pa.int8()}
# Bytes per stored value (the per-row scale of int8 comes on top).
VECTOR_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def _schema(fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()})


def examples_schema() -> pa.Schema:
    """One row per training sequence (a chunk of a document)."""
    return _schema(
        [
            pa.field("example_id", pa.int64(), nullable=False),
            pa.field("document_id", pa.string(), nullable=False),
            pa.field("chunk_index", pa.int32(), nullable=False),
            pa.field("token_start", pa.int32(), nullable=False),
            pa.field("token_end", pa.int32(), nullable=False),
            pa.field("num_tokens", pa.int32(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            # Null when the dataset has no source column.
            pa.field("source", pa.string()),
            # The exact tokens gradients are logged on, so no shard task re-tokenizes.
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            # False on tokens whose labels carry no loss (a prompt, a conversation's user turns); null: every
            # token's label counts.
            pa.field(LABEL_MASK, pa.list_(pa.bool_())),
        ]
    )


# Added to the examples table after schema version 1 was released: a stored table without it (written before)
# reads as a loss on every token, which is what it was logged with.
LABEL_MASK = "label_mask"


def legacy_examples_schema() -> pa.Schema:
    """The examples table as written before it had the label_mask column."""
    return _schema([f for f in examples_schema() if f.name != LABEL_MASK])


def gradients_schema(dim: int, dtype: str) -> pa.Schema:
    """One projected gradient per example; sq_norm is taken before any rounding to the storage dtype. int8 tables
    also hold each row's dequantization scale."""
    if not isinstance(dim, int) or dim < 1:
        raise IndexStoreError(f"gradient dim must be a positive int, got {dim!r}")
    if dtype not in VECTOR_DTYPES:
        raise IndexStoreError(f"gradient storage dtype {dtype!r} is not supported: use one of {sorted(VECTOR_DTYPES)}")
    return _schema(
        [
            pa.field("example_id", pa.int64(), nullable=False),
            pa.field("shard", pa.int32(), nullable=False),
            pa.field("vector", pa.list_(VECTOR_DTYPES[dtype], dim), nullable=False),
            pa.field("sq_norm", pa.float32(), nullable=False),
            *([pa.field("scale", pa.float32(), nullable=False)] if dtype == "int8" else []),
        ]
    )


def gradient_columns(dtype: str) -> list[str]:
    """The columns a reader selects to rebuild float32 vectors of a gradients table stored in `dtype`."""
    return ["example_id", "vector", "sq_norm", *(["scale"] if dtype == "int8" else [])]


def scores_schema() -> pa.Schema:
    """Top-k scores per query and mode; index_version pins the gradients table version scored."""
    return _schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("query_id", pa.string(), nullable=False),
            pa.field("example_id", pa.int64(), nullable=False),
            pa.field("score", pa.float64(), nullable=False),
            pa.field("rank", pa.int32(), nullable=False),
            pa.field("mode", pa.string(), nullable=False),
            pa.field("index_version", pa.int64(), nullable=False),
        ]
    )


def queries_schema() -> pa.Schema:
    """The queries of a scoring run, with the completion actually attributed."""
    return _schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("query_id", pa.string(), nullable=False),
            pa.field("prompt", pa.string(), nullable=False),
            pa.field("completion", pa.string(), nullable=False),
            pa.field("generated", pa.bool_(), nullable=False),
            pa.field("num_completion_tokens", pa.int32(), nullable=False),
        ]
    )


def token_scores_schema() -> pa.Schema:
    """Token-wise attribution of a scoring run's top examples: one row per token of a (mode, query, rank) pair,
    side 'query' (the query's completion tokens, position counted from the completion's first) or 'train' (the
    example's tokens, position in the example). A side's scores sum to `total`, the pair's score."""
    return _schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("mode", pa.string(), nullable=False),
            pa.field("query_id", pa.string(), nullable=False),
            pa.field("rank", pa.int32(), nullable=False),
            pa.field("example_id", pa.int64(), nullable=False),
            pa.field("document_id", pa.string(), nullable=False),
            pa.field("side", pa.string(), nullable=False),
            pa.field("position", pa.int32(), nullable=False),
            pa.field("token_id", pa.int64(), nullable=False),
            pa.field("token", pa.string(), nullable=False),
            pa.field("score", pa.float64(), nullable=False),
            pa.field("total", pa.float64(), nullable=False),
        ]
    )


def artifacts_schema() -> pa.Schema:
    """Opaque blobs by key: the fitted curvature (a torch.save blob) and the manifest JSON."""
    return _schema(
        [
            pa.field("key", pa.string(), nullable=False),
            # large_binary: curvature blobs can pass the 2 GiB offset limit of binary.
            pa.field("value", pa.large_binary(), nullable=False),
        ]
    )


def conform(table: pa.Table, schema: pa.Schema, name: str) -> pa.Table:
    """Return `table` with exactly `schema`: same columns, types cast safely, no stray nulls."""
    if not isinstance(table, pa.Table):
        raise IndexStoreError(f"{name}: expected a pyarrow.Table, got {type(table).__name__}")
    missing = [f for f in schema.names if f not in table.column_names]
    extra = [c for c in table.column_names if c not in schema.names]
    if missing or extra:
        problems = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        raise IndexStoreError(
            f"{name} table has the wrong columns: {', '.join(problems)}; expected exactly {schema.names}"
        )
    columns = []
    for field in schema:
        column = table.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise IndexStoreError(
                    f"{name} column {field.name!r} has type {column.type}, "
                    f"which does not convert to {field.type}: {exc}"
                ) from None
        if not field.nullable and column.null_count:
            raise IndexStoreError(
                f"{name} column {field.name!r} has {column.null_count} null values; it must be filled"
            )
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def check_stored_schema(actual: pa.Schema, expected: pa.Schema | Callable[[pa.Schema], pa.Schema], name: str) -> None:
    """Refuse a stored table written by another schema version or by something else.

    `expected` may be a function of the stored schema (gradients carry their own dim and dtype);
    it is called only once the version is known to be ours.
    """
    version = (actual.metadata or {}).get(VERSION_KEY)
    if version is None:
        raise IndexStoreError(f"table {name!r} was not written by dataworth (no schema version); {REBUILD_HINT}")
    if version != str(SCHEMA_VERSION).encode():
        raise IndexStoreError(
            f"table {name!r} has schema version {version.decode(errors='replace')}, this dataworth reads "
            f"version {SCHEMA_VERSION}; {REBUILD_HINT}"
        )
    if callable(expected):
        expected = expected(actual)
    got = [(f.name, f.type) for f in actual]
    want = [(f.name, f.type) for f in expected]
    if got != want:
        raise IndexStoreError(
            f"table {name!r} has columns {[f'{n}: {t}' for n, t in got]}, expected "
            f"{[f'{n}: {t}' for n, t in want]}; {REBUILD_HINT}"
        )


def vector_layout(schema: pa.Schema, name: str = "gradients") -> tuple[int, str]:
    """(dim, dtype) of a stored gradients table, from its vector column."""
    try:
        vtype = schema.field("vector").type
    except KeyError:
        vtype = None
    if vtype is None or not pa.types.is_fixed_size_list(vtype) or vtype.value_type not in VECTOR_DTYPES.values():
        raise IndexStoreError(
            f"table {name!r} has no fixed-size 'vector' column of a storage dtype {sorted(VECTOR_DTYPES)} "
            f"(found {vtype}); {REBUILD_HINT}"
        )
    dtype = next(k for k, v in VECTOR_DTYPES.items() if v == vtype.value_type)
    return vtype.list_size, dtype
