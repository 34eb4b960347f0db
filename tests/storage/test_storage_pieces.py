"""iter_gradient_pieces: the batches of iter_gradients as the scanned pieces they are made of."""

from __future__ import annotations

import numpy as np
import pytest

from storage import IndexStore, IndexStoreError
from storage.store import _READ_ROWS, batch_buffer


@pytest.fixture
def store(tmp_path):
    store = IndexStore(str(tmp_path / "index"))
    for shard in range(3):
        ids = np.arange(shard * 700, shard * 700 + 700)
        vectors = np.random.default_rng(shard).standard_normal((len(ids), 6)).astype(np.float32)
        store.write_gradient_shard(shard, ids, vectors, "float32")
    return store


@pytest.mark.parametrize("batch_size", [1, 7, 500, _READ_ROWS, _READ_ROWS + 1, 2100, 5000])
def test_pieces_make_the_batches_of_iter_gradients(store, batch_size):
    batches = list(store.iter_gradients(batch_size))
    groups = list(store.iter_gradient_pieces(batch_size))
    assert [len(ids) for ids, _, _ in batches] == [sum(len(p[0]) for p in g) for g in groups]
    assert all(len(ids) == batch_size for ids, _, _ in batches[:-1]) and 0 < len(batches[-1][0]) <= batch_size
    for batch, group in zip(batches, groups):
        for whole, parts in zip(batch, zip(*group)):
            merged = np.concatenate(parts)
            assert merged.dtype == whole.dtype
            np.testing.assert_array_equal(merged, whole)
    assert sorted(np.concatenate([b[0] for b in batches]).tolist()) == list(range(2100))


def test_pieces_of_some_shards_and_errors(store):
    ids = [i for group in store.iter_gradient_pieces(300, shards=[0, 2]) for p in group for i in p[0]]
    assert sorted(ids) == [*range(0, 700), *range(1400, 2100)]
    with pytest.raises(IndexStoreError, match="batch_size must be a positive int"):
        store.iter_gradient_pieces(0)
    with pytest.raises(IndexStoreError, match="shards must be a non-empty list"):
        store.iter_gradient_pieces(4, shards=[])


def test_batch_buffer_is_writable_float32():
    buf = batch_buffer(3, 5)
    assert buf.shape == (3, 5) and buf.dtype == np.float32 and buf.flags.writeable and buf.flags.c_contiguous
    buf[:] = 1.0
    assert buf.sum() == 15.0
