"""Worker of the parallel-writer storage test, in a top-level module of tests/ (on pytest's
pythonpath) so spawned processes can import it: a `tests` package installed by another project
(kronfluence ships one) would hide `tests.storage.*` from them."""

import numpy as np

from storage import IndexStore

SHARDS, ROWS, DIM = 3, 10, 8


def write_shard(uri: str, shard: int, barrier) -> None:
    ids = np.arange(shard * ROWS, (shard + 1) * ROWS)
    vectors = np.full((ROWS, DIM), shard, dtype=np.float32)
    barrier.wait()  # start together to provoke commit conflicts
    store = IndexStore(uri)
    store.write_gradient_shard(shard, ids, vectors, "float32")
    store.write_gradient_shard(shard, ids, vectors, "float32")


def stage_shard(uri: str, shard: int, barrier) -> None:
    """A new shard staged (new=True), then read at once: every writer commits what is staged, concurrently."""
    ids = np.arange(shard * ROWS, (shard + 1) * ROWS)
    vectors = np.full((ROWS, DIM), shard, dtype=np.float32)
    store = IndexStore(uri)
    store.write_gradient_shard(shard, ids, vectors, "float32", new=True)
    barrier.wait()  # every shard staged; now all commit together
    store.num_gradients()
