"""The index flow logs gradients with each shard's write overlapping another shard's compute, and keeps a
fixed number of shards in flight whatever the corpus size. No timing thresholds: each write waits (up to a
generous timeout that fails the test) until another shard's compute has started after its own ended."""

import threading

import pytest
from tiny import TINY_CORPUS, tiny_index_config, write_tiny_assets

import tasks.index
from storage import IndexStore

pytestmark = pytest.mark.slow

DEADLOCK_S = 120  # only a failure detector: a serial logger would wait here forever


class Probe:
    """Counts shard computes and writes as the real log_gradients runs them."""

    def __init__(self):
        self.cond = threading.Condition()
        self.compute_starts = 0
        self.starts_when_done: dict[int, int] = {}  # shard -> compute starts counted when its compute ended
        self.overlapped: list[int] = []  # writes during which another shard's compute started
        self.last: list[int] = []  # the write of the shard computed last (nothing left to overlap)
        self.stalled: list[int] = []  # writes that waited DEADLOCK_S for a compute
        self.in_flight = self.max_in_flight = 0

    def read(self, real):
        def read_examples(*args, **kwargs):
            with self.cond:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return real(*args, **kwargs)

        return read_examples

    def compute(self, real):
        def log_example_gradients(model, tokenizer, examples, cfg, *args, **kwargs):
            shard = examples[0].example_id // cfg.shard_size
            with self.cond:
                self.compute_starts += 1
                self.cond.notify_all()
            yield from real(model, tokenizer, examples, cfg, *args, **kwargs)
            with self.cond:
                self.starts_when_done[shard] = self.compute_starts

        return log_example_gradients

    def write(self, real):
        def write_gradient_shard(store, shard, *args, **kwargs):
            if shard != 0:  # the flow logs shard 0 alone (it creates the table): nothing to overlap
                n_shards = store.num_examples()  # shards of one example
                with self.cond:
                    seen = self.starts_when_done[shard]
                    if seen == n_shards:
                        self.last.append(shard)
                    elif self.cond.wait_for(lambda: self.compute_starts > seen, timeout=DEADLOCK_S):
                        self.overlapped.append(shard)
                    else:
                        self.stalled.append(shard)
            try:
                return real(store, shard, *args, **kwargs)
            finally:
                with self.cond:
                    self.in_flight -= 1

        return write_gradient_shard


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("overlap"), TINY_CORPUS)


def test_shard_writes_overlap_the_next_compute_with_few_shards_in_flight(harness, assets, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from flows.index import index_flow

    cfg = tiny_index_config(assets, tmp_path, precondition="none")
    cfg = cfg.model_copy(update={"logging": cfg.logging.model_copy(update={"shard_size": 1})})
    probe = Probe()
    monkeypatch.setattr(tasks.index, "_read_examples", probe.read(tasks.index._read_examples))
    monkeypatch.setattr(tasks.index, "log_example_gradients", probe.compute(tasks.index.log_example_gradients))
    monkeypatch.setattr(IndexStore, "write_gradient_shard", probe.write(IndexStore.write_gradient_shard))

    out = index_flow(cfg, progress=False)

    n_examples = out["examples"]
    assert out["shards"] == n_examples >= 10
    assert probe.stalled == [], f"shards {probe.stalled}: a write waited {DEADLOCK_S} s for the next compute"
    assert sorted(probe.overlapped + probe.last) == list(range(1, n_examples)) and len(probe.last) <= 1
    # Three shards in flight at most (this process: one computing, one waiting, one writing), not one per shard.
    assert probe.in_flight == 0 and 2 <= probe.max_in_flight <= 3
    IndexStore(cfg.index_uri).check_gradient_ids(n_examples)

    assert out["log_workers"] == 1
    metrics = MlflowClient(out["tracking_uri"]).get_run(out["mlflow_run_id"]).data.metrics
    assert metrics["log_workers"] == 1 and {"log_write_seconds", "log_compute_seconds"} <= set(metrics)
