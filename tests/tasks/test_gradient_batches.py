"""gradient_batches: the stored gradients as torch tensors, one copy per batch, read ahead of the caller."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from storage import IndexStore
from tasks.common import gradient_batches


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("batch_size", [1, 9, 1000, 1500, 4096])
def test_gradient_batches_equal_iter_gradients(tmp_path, dtype, batch_size):
    store = IndexStore(str(tmp_path / "index"))
    for shard in range(3):
        ids = np.arange(shard * 500, shard * 500 + 500)
        vectors = np.random.default_rng(shard).standard_normal((len(ids), 8)).astype(np.float32)
        store.write_gradient_shard(shard, ids, vectors, dtype)
    expected = list(store.iter_gradients(batch_size))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about a read-only numpy array
        got = list(gradient_batches(store, batch_size))
    assert len(got) == len(expected)
    for (ids, vectors), (want_ids, want_vectors, _) in zip(got, expected):
        assert ids.dtype == torch.int64 and vectors.dtype == torch.float32 and vectors.is_contiguous()
        np.testing.assert_array_equal(ids.numpy(), want_ids)
        np.testing.assert_array_equal(vectors.numpy(), want_vectors)
        vectors.mul_(2)  # the caller's own writable copy
    np.testing.assert_array_equal(np.asarray(expected[0][1]), next(store.iter_gradients(batch_size))[1])
