"""Conversions between numpy gradient shards and Arrow rows of the gradients table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from storage.errors import IndexStoreError
from storage.schemas import VECTOR_DTYPES, gradients_schema

_INT32_MAX = np.iinfo(np.int32).max
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_INT8_MAX = 127


def encode_vectors(vecs32: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(stored values [n, dim] in the vector column's Arrow type, per-row scale or None) of finite float32 rows.

    bfloat16: float32 rounded to nearest even on the upper 16 bits (torch's rounding), kept as uint16. int8: each
    row divided by its own scale max|g| / 127 and rounded, so a row's largest value is ±127 (a zero row has scale
    0 and decodes to zeros); one float32 per row more."""
    if dtype == "float32":
        return vecs32, None
    if dtype == "float16":
        return vecs32.astype(np.float16), None
    if dtype == "bfloat16":
        bits = vecs32.view(np.uint32)
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
        return (rounded >> np.uint32(16)).astype(np.uint16), None
    if dtype == "int8":
        scale = (np.abs(vecs32).max(axis=1) / np.float32(_INT8_MAX)).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1))
        return np.rint(vecs32 / safe[:, None]).astype(np.int8), scale
    raise IndexStoreError(f"gradient storage dtype {dtype!r} is not supported: use one of {sorted(VECTOR_DTYPES)}")


def decode_vectors(values: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """float32 [n, dim] of stored values (encode_vectors' inverse up to its rounding); float32 comes back as is."""
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if dtype == "int8":
        return values.astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None]
    return values.astype(np.float32, copy=False)


def show_ids(ids: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}] ({len(ids)} in all)"


def squared_norms(vectors: np.ndarray) -> np.ndarray:
    """‖g‖² per row as the gradients table stores it (sq_norm): accumulated in float64, kept as float32."""
    return np.square(np.asarray(vectors, dtype=np.float32), dtype=np.float64).sum(axis=1).astype(np.float32)


def gradient_table(
    shard: int, example_ids: np.ndarray, vectors: np.ndarray, dtype: str, sq_norms: np.ndarray | None = None
) -> pa.Table:
    """Validate one shard and build its rows; sq_norm comes from the float32 values unless sq_norms is given."""
    if isinstance(shard, bool) or not isinstance(shard, (int, np.integer)) or not 0 <= shard <= _INT32_MAX:
        raise IndexStoreError(f"shard must be an int in [0, {_INT32_MAX}], got {shard!r}")
    shard = int(shard)
    ids = np.asarray(example_ids)
    vecs = np.asarray(vectors)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise IndexStoreError(
            f"shard {shard}: example_ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}"
        )
    if vecs.ndim != 2 or vecs.shape[0] == 0 or vecs.shape[1] == 0:
        raise IndexStoreError(
            f"shard {shard}: vectors must be a non-empty 2-D array [num_examples, dim], got shape {vecs.shape}"
        )
    if not (np.issubdtype(vecs.dtype, np.floating) or np.issubdtype(vecs.dtype, np.integer)):
        raise IndexStoreError(f"shard {shard}: vectors must be numeric, got dtype {vecs.dtype}")
    if len(ids) != vecs.shape[0]:
        raise IndexStoreError(
            f"shard {shard}: {len(ids)} example_ids for {vecs.shape[0]} vectors; pass one id per row of vectors"
        )
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        raise IndexStoreError(
            f"shard {shard}: duplicate example_ids {show_ids(unique[counts > 1])}; ids must be unique"
        )

    vecs32 = np.ascontiguousarray(vecs, dtype=np.float32)
    bad_rows = ~np.isfinite(vecs32).all(axis=1)
    if bad_rows.any():
        raise IndexStoreError(
            f"shard {shard}: non-finite gradient values (NaN or inf in float32) for example_ids "
            f"{show_ids(ids[bad_rows])}; check the loss of these examples and the model dtype"
        )
    if dtype == "float16":
        # Values past float16's range would silently become inf in storage.
        big_rows = (np.abs(vecs32) > _FLOAT16_MAX).any(axis=1)
        if big_rows.any():
            raise IndexStoreError(
                f"shard {shard}: gradient values exceed the float16 range (±{_FLOAT16_MAX:g}) for example_ids "
                f"{show_ids(ids[big_rows])}; use storage_dtype='float32'"
            )

    schema = gradients_schema(int(vecs32.shape[1]), dtype)
    if sq_norms is None:
        sq_norm = squared_norms(vecs32)
    else:
        sq_norm = np.asarray(sq_norms, dtype=np.float32)
        if sq_norm.shape != (len(ids),) or not np.isfinite(sq_norm).all():
            raise IndexStoreError(
                f"shard {shard}: sq_norms must be {len(ids)} finite values, one per row, got shape {sq_norm.shape}"
            )
    stored, scale = encode_vectors(vecs32, dtype)
    if dtype == "bfloat16" and not np.isfinite(decode_vectors(stored, dtype)).all():
        raise IndexStoreError(
            f"shard {shard}: gradient values round past the bfloat16 range for example_ids "
            f"{show_ids(ids[~np.isfinite(decode_vectors(stored, dtype)).all(axis=1)])}; use storage_dtype='float32'"
        )
    vector_col = pa.FixedSizeListArray.from_arrays(pa.array(stored.reshape(-1)), vecs32.shape[1])
    return pa.Table.from_arrays(
        [
            pa.array(ids.astype(np.int64)),
            pa.array(np.full(len(ids), shard, dtype=np.int32)),
            vector_col,
            pa.array(sq_norm),
            *([pa.array(scale)] if scale is not None else []),
        ],
        schema=schema,
    )


def batch_arrays(batch: pa.RecordBatch, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(example_ids int64, vectors float32 [n, dim], sq_norm float32) of one scanned batch (float32 vectors are
    views of the batch's buffer; other storage dtypes are decoded into a new array)."""
    ids = batch.column("example_id").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    # flatten() honours slice offsets, unlike .values.
    column = batch.column("vector")
    dtype = next(k for k, v in VECTOR_DTYPES.items() if v == column.type.value_type)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    scale = batch.column("scale").to_numpy(zero_copy_only=False) if dtype == "int8" else None
    vectors = decode_vectors(flat.reshape(-1, dim), dtype, scale)
    sq_norm = batch.column("sq_norm").to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return ids, vectors, sq_norm
