"""Shards written by parallel processes into one LanceDB directory, as GPU workers do."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
from shard_writer import ROWS, SHARDS
from shard_writer import stage_shard as _stage_shard
from shard_writer import write_shard as _write_shard

from storage import IndexStore


def _run_writers(target, uri: str) -> None:
    """One process per shard running target(uri, shard, barrier), all released together; each must exit 0."""
    # spawn: lancedb's runtime does not survive fork reliably.
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(SHARDS)
    procs = [ctx.Process(target=target, args=(uri, s, barrier)) for s in range(SHARDS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * SHARDS


def test_parallel_shard_writers_lose_nothing(tmp_path):
    # No create_gradient_table first: the writers race to create the table, too.
    uri = str(tmp_path / "index")
    store = IndexStore(uri)
    _run_writers(_write_shard, uri)
    assert store.num_gradients() == SHARDS * ROWS
    assert store.shards_present() == set(range(SHARDS))
    for ids, vectors, _ in store.iter_gradients(batch_size=16):
        np.testing.assert_array_equal(vectors[:, 0], ids // ROWS)


def test_staged_shards_committed_by_parallel_readers_are_stored_once(tmp_path):
    # Every process stages its shard, then reads the latest version, which commits what is staged: the commits
    # race, and each staged shard must still be appended exactly once.
    uri = str(tmp_path / "index")
    store = IndexStore(uri)
    store.create_gradient_table(8)
    _run_writers(_stage_shard, uri)
    store.check_gradient_ids(SHARDS * ROWS)
    assert store.shards_present() == set(range(SHARDS)) and store.commit_staged() is None
    for ids, vectors, _ in store.iter_gradients(batch_size=16):
        np.testing.assert_array_equal(vectors[:, 0], ids // ROWS)
