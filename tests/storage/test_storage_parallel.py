"""Shards written by parallel processes into one LanceDB directory, as GPU workers do."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
from shard_writer import ROWS, SHARDS
from shard_writer import write_shard as _write_shard

from storage import IndexStore


def test_parallel_shard_writers_lose_nothing(tmp_path):
    # No create_gradient_table first: the writers race to create the table, too.
    uri = str(tmp_path / "index")
    store = IndexStore(uri)
    # spawn: lancedb's runtime does not survive fork reliably.
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(SHARDS)
    procs = [ctx.Process(target=_write_shard, args=(uri, s, barrier)) for s in range(SHARDS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * SHARDS
    assert store.num_gradients() == SHARDS * ROWS
    assert store.shards_present() == set(range(SHARDS))
    for ids, vectors, _ in store.iter_gradients(batch_size=16):
        np.testing.assert_array_equal(vectors[:, 0], ids // ROWS)
