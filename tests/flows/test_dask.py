"""The index and query flows on a local 2-process Dask cluster (prefect-dask's DaskTaskRunner) give the
single-process result: the same stored gradients per example id, the same top-k ids and scores; both
processes log shards of the one index, and each shard is stored exactly once."""

import numpy as np
import pytest
from tiny import TINY_CORPUS, tiny_index_config, write_tiny_assets, write_tiny_queries

from dataworth.config import QueryConfig, RunnerConfig, ScoreConfig
from storage import IndexStore, results_store

pytestmark = pytest.mark.slow

TEXTS = TINY_CORPUS
DASK = RunnerConfig(kind="dask", n_workers=2, threads_per_worker=1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = write_tiny_assets(tmp_path_factory.mktemp("dask"), TEXTS)
    write_tiny_queries(root / "queries.jsonl")
    return root


def _gradients(uri: str) -> dict[int, np.ndarray]:
    return {int(i): v for ids, vecs, _ in IndexStore(uri).iter_gradients(100) for i, v in zip(ids, vecs)}


def _top_k(uri: str, srid: str) -> list[tuple]:
    rows = results_store(uri).read_scores(srid).to_pylist()
    return sorted((r["mode"], r["query_id"], r["rank"], r["example_id"], r["score"]) for r in rows)


def _config(assets, out):
    cfg = tiny_index_config(assets, out)
    return cfg.model_copy(update={"logging": cfg.logging.model_copy(update={"shard_size": 3})})


def test_index_and_query_on_a_two_process_dask_cluster(harness, assets, tmp_path):
    from flows.index import index_flow
    from flows.query import query_flow
    from flows.runner import run_flow, task_runner

    assert type(task_runner(DASK)).__name__ == "DaskTaskRunner"
    one = _config(assets, tmp_path / "one")
    spread = _config(assets, tmp_path / "dask").model_copy(update={"runner": DASK})
    out_one = run_flow(index_flow, one, progress=False)
    out_dask = run_flow(index_flow, spread, progress=False)
    assert out_dask["examples"] == out_one["examples"] and out_dask["shards"] == out_one["shards"] >= 6
    # Shard 0 runs alone, then the other shards all at once (the window is 3 per worker): each of the two idle
    # workers takes one, and a shard's task (task-run bookkeeping, reading its examples, the model's
    # forward/backward) takes far longer than the flow needs to submit the next.
    assert out_one["log_workers"] == 1 and out_dask["log_workers"] == 2
    for cfg, out in ((one, out_one), (spread, out_dask)):
        store = IndexStore(cfg.index_uri)
        store.check_gradient_ids(out["examples"])  # no shard stored twice, none missed
        assert store.shards_present() == set(range(out["shards"]))
    a, b = _gradients(one.index_uri), _gradients(spread.index_uri)
    assert sorted(a) == sorted(b) == list(range(out_one["examples"]))
    for i in a:
        assert np.array_equal(a[i], b[i]), i

    def query(cfg, **kw):
        return QueryConfig(
            index_uri=cfg.index_uri,
            queries_path=str(assets / "queries.jsonl"),
            score=ScoreConfig(top_k=3, query_batch_size=1, **kw),
            tracking=cfg.tracking,
            runner=cfg.runner,
        )

    q_one = run_flow(query_flow, query(one))
    q_dask = run_flow(query_flow, query(spread, shards_per_task=1))
    assert q_dask["pairs"] == q_one["pairs"] and q_dask["queries"] == q_one["queries"] == 2
    expected = _top_k(one.index_uri, q_one["score_run_id"])
    assert len(expected) == 4 * 2 * 3
    assert _top_k(spread.index_uri, q_dask["score_run_id"]) == expected
