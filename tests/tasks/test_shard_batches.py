"""shard_batches (the query path's read): each shard's rows in id order, cut into batches of batch_size, copied
once from the scanner's views into their own buffers: the same batches as sorting a shard's merged rows."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from storage import IndexStore
from tasks.query import shard_batches

SHARD, DIM = 500, 8


def reference_batches(store: IndexStore, batch_size: int, shards: list[int] | None = None):
    """The rule itself, on merged numpy copies: per shard (in scan order), rows sorted by id (stable), cut."""
    ids, vectors = map(np.concatenate, zip(*[(i, v) for i, v, _ in store.iter_gradients(4096, shards=shards)]))
    keys = ids // SHARD
    cuts = np.r_[0, np.flatnonzero(np.diff(keys)) + 1, len(ids)]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        order = np.argsort(ids[lo:hi], kind="stable")
        shard_ids, shard_vectors = ids[lo:hi][order], vectors[lo:hi][order]
        for start in range(0, hi - lo, batch_size):
            yield shard_ids[start : start + batch_size], shard_vectors[start : start + batch_size]


@pytest.fixture(params=["in order", "shuffled", "reversed"])
def store(request, tmp_path):
    store = IndexStore(str(tmp_path / "index"))
    rng = np.random.default_rng(0)
    for shard in (2, 0, 1):  # scan order is write order, not shard order
        ids = np.arange(shard * SHARD, shard * SHARD + SHARD - 7 * shard)  # shards of unequal size
        if request.param == "shuffled":
            ids = rng.permutation(ids)
        elif request.param == "reversed":
            ids = ids[::-1].copy()
        vectors = rng.standard_normal((len(ids), DIM)).astype(np.float32)
        store.write_gradient_shard(shard, ids, vectors)
    return store


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("shards", [None, [1, 2]])
@pytest.mark.parametrize("batch_size", [1, 7, 300, 1024, 5000])
def test_shard_batches_equal_sorting_each_shard(store, batch_size, shards, compact):
    if compact:
        store.compact_gradients()  # one fragment: scanned batches now cross shard boundaries
    expected = list(reference_batches(store, batch_size, shards))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about a read-only numpy array
        got = list(shard_batches(store, batch_size, SHARD, shards=shards))
    assert len(got) == len(expected)
    for (ids, vectors), (want_ids, want_vectors) in zip(got, expected):
        assert ids.dtype == torch.int64 and vectors.dtype == torch.float32 and vectors.is_contiguous()
        np.testing.assert_array_equal(ids.numpy(), want_ids)
        assert vectors.numpy().tobytes() == np.ascontiguousarray(want_vectors).tobytes()  # the same bits
        vectors.mul_(2)  # the caller's own writable copy
    assert sum(len(ids) for ids, _ in got) == sum(len(ids) for ids, _ in expected) > 0
