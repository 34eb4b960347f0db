"""Gradient ingest at constant cost per shard: appends, exact rewrites, crash recovery, compaction."""

from __future__ import annotations

import numpy as np
import pytest
from lancedb.table import LanceTable

import storage.store
from storage import IndexStore, IndexStoreError


@pytest.fixture
def store(tmp_path):
    return IndexStore(str(tmp_path / "index"))


def _write(store, shard, n=4, seed=None, dim=6, offset=None):
    ids = np.arange(shard * n, shard * n + n) if offset is None else np.arange(offset, offset + n)
    vecs = np.random.default_rng(shard if seed is None else seed).standard_normal((n, dim)).astype(np.float32)
    store.write_gradient_shard(shard, ids, vecs, "float32")
    return ids, vecs


def _rows(store, version=None):
    table = store._require("gradients", version)
    got = table.search().select(["example_id", "shard", "_rowaddr"]).to_arrow().to_pydict()
    return {e: (s, a) for e, s, a in zip(got["example_id"], got["shard"], got["_rowaddr"])}


def _vectors_by_id(store, version=None):
    out = {}
    for ids, vecs, _ in store.iter_gradients(batch_size=64, version=version):
        out.update({int(i): v for i, v in zip(ids, vecs)})
    return out


def test_new_shard_is_one_append_that_leaves_stored_fragments_alone(store, monkeypatch):
    # The cost model: a new shard adds its own fragments in one commit; it neither joins nor rewrites
    # what is stored, so its cost does not grow with the table.
    monkeypatch.setattr(LanceTable, "merge_insert", lambda *a, **k: pytest.fail("merge_insert joins the whole table"))
    for shard in range(3):
        _write(store, shard)
    before, version, fragments = _rows(store), store.gradients_version(), store.gradient_fragments()
    assert fragments == 3
    _write(store, 3)
    after = _rows(store)
    assert store.gradients_version() == version + 1  # one commit
    assert store.gradient_fragments() == fragments + 1
    assert {e: after[e] for e in before} == before  # same rows at the same addresses
    newest = max(addr >> 32 for _, addr in before.values())
    assert all(addr >> 32 > newest for e, (_, addr) in after.items() if e not in before)


def test_shard_written_twice_is_stored_once_and_rewrite_replaces_exactly(store):
    for shard in range(3):
        _write(store, shard)
    _write(store, 1)
    _write(store, 1)
    store.check_gradient_ids(12)
    assert store.num_gradients() == 12
    others = {e: v for e, v in _rows(store).items() if v[0] != 1}
    # Rewritten with other ids, fewer rows and other values: exactly the new rows remain.
    ids, vecs = _write(store, 1, n=3, seed=9, offset=20)
    rows = _rows(store)
    assert sorted(e for e, (s, _) in rows.items() if s == 1) == ids.tolist()
    assert {e: v for e, v in rows.items() if v[0] != 1} == others  # other shards untouched
    got = _vectors_by_id(store)
    np.testing.assert_array_equal(np.stack([got[int(i)] for i in ids]), vecs)
    assert store.shards_present() == {0, 1, 2} and store.num_gradients() == 11


def test_writer_killed_between_delete_and_add_leaves_no_half_shard_and_retry_converges(store, monkeypatch):
    for shard in range(3):
        _write(store, shard)
    published = store.gradients_version()
    expected = _vectors_by_id(store)
    real_add = LanceTable.add

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("writer killed")

    monkeypatch.setattr(LanceTable, "add", killed)
    with pytest.raises(KeyboardInterrupt):
        _write(store, 1, seed=5)
    # The shard is absent (old rows gone, new ones not added), never half or doubled; the flow's
    # shards_present shows it missing and publish refuses the table.
    assert store.shards_present() == {0, 2} and store.num_gradients() == 8
    with pytest.raises(IndexStoreError, match=r"missing example_ids \[4, 5, 6, 7\]"):
        store.check_gradient_ids(12)
    # A reader pinned to the published version still sees every row.
    assert store.num_gradients(published) == 12
    monkeypatch.setattr(LanceTable, "add", real_add)
    _, vecs = _write(store, 1, seed=5)  # the retry
    store.check_gradient_ids(12)
    got = _vectors_by_id(store)
    np.testing.assert_array_equal(np.stack([got[i] for i in range(4, 8)]), vecs)
    assert all(np.array_equal(got[i], expected[i]) for i in (*range(4), *range(8, 12)))


def test_check_gradient_ids_names_doubled_and_unknown_ids(store):
    _write(store, 0)
    _write(store, 1)
    store.check_gradient_ids(8)
    store._require("gradients").add(store._require("gradients").search().where("example_id = 5").to_arrow())
    with pytest.raises(IndexStoreError, match=r"stored more than once \[5\]"):
        store.check_gradient_ids(8)
    with pytest.raises(IndexStoreError, match=r"outside 0..5 \[6, 7, 5\]|outside 0..5 \[6, 7\]"):
        store.check_gradient_ids(6)


def test_shard_index_is_rebuilt_and_lookups_stay_exact(store, monkeypatch):
    monkeypatch.setattr(storage.store, "_INDEX_EVERY", 2)
    for shard in range(7):
        _write(store, shard, n=2)
    stats = store._require("gradients").index_stats(storage.store._SHARD_INDEX)
    assert stats is not None and stats.num_unindexed_rows < 2 * 2
    _write(store, 2, n=2, seed=11)  # a rewrite found through the index
    _write(store, 6, n=2, seed=12)
    store.check_gradient_ids(14)
    assert store.shards_present() == set(range(7))
    assert sorted(_vectors_by_id(store, None)) == list(range(14))
    assert sorted(i for ids, _, _ in store.iter_gradients(batch_size=8, shards=[2, 6]) for i in ids) == [4, 5, 12, 13]
    assert store.delete_shards_from(5) == store.gradients_version() and store.shards_present() == set(range(5))


def test_compaction_keeps_rows_and_pinned_versions(store):
    for shard in range(5):
        _write(store, shard)
    _write(store, 3, seed=7)  # leaves a deletion behind
    before, version = _vectors_by_id(store), store.gradients_version()
    assert store.compact_gradients(min_fragments=100) == version  # too few fragments: no commit
    compacted = store.compact_gradients()
    assert compacted > version and store.gradient_fragments() == 1
    after = _vectors_by_id(store, compacted)
    assert sorted(after) == sorted(before) and all(np.array_equal(after[i], before[i]) for i in before)
    store.check_gradient_ids(20, compacted)
    # A reader pinned to the version before compaction still reads it.
    pinned = _vectors_by_id(store, version)
    assert sorted(pinned) == sorted(before) and all(np.array_equal(pinned[i], before[i]) for i in before)
    assert store.compact_gradients() == compacted  # nothing left to merge: no new version
    _write(store, 5)
    latest = store.compact_gradients(keep_old_versions=False)
    assert store.num_gradients(latest) == 24
    with pytest.raises(IndexStoreError, match="has no version"):
        store.num_gradients(version)
    assert IndexStore(store.uri + "_none").compact_gradients() is None


def test_shard_known_new_is_one_append_with_no_lookup_and_a_rewrite_repairs_a_wrong_hint(store, monkeypatch):
    _write(store, 0)
    calls = []
    for name in ("count_rows", "delete", "create_index", "index_stats"):
        real = getattr(LanceTable, name)
        spy = lambda self, *a, _n=name, _r=real, **k: calls.append(_n) or _r(self, *a, **k)  # noqa: E731
        monkeypatch.setattr(LanceTable, name, spy)
    version = store.gradients_version()
    ids, vecs = np.arange(4, 8), np.ones((4, 6), np.float32)
    assert store.write_gradient_shard(1, ids, vecs, new=True) == version  # staged: no commit yet
    assert calls == []  # no lookup of old rows, no index upkeep
    assert store.shards_present() == {0, 1}
    monkeypatch.undo()
    store.check_gradient_ids(8)  # a read of the latest version commits it
    assert store.gradients_version() == version + 1
    # A wrong hint (the shard was stored after all) doubles it; publish's check names it, a rewrite repairs it.
    store.write_gradient_shard(1, ids, vecs, new=True)
    with pytest.raises(IndexStoreError, match="more than once"):
        store.check_gradient_ids(8)
    store.write_gradient_shard(1, ids, 2 * vecs)
    store.check_gradient_ids(8)
    assert all((_vectors_by_id(store)[i] == 2).all() for i in range(4, 8))


def _staged(store):
    return sorted(store._staged_records())


def _stage(store, shard, n=4, value=None, dim=6):
    ids = np.arange(shard * n, shard * n + n)
    vecs = np.full((n, dim), shard if value is None else value, np.float32)
    store.write_gradient_shard(shard, ids, vecs, "float32", new=True)


def test_new_shards_are_staged_and_one_commit_appends_them_all(store):
    store.create_gradient_table(6)
    version = store.gradients_version()
    for shard in range(5):
        _stage(store, shard)
    assert _staged(store) == [0, 1, 2, 3, 4] and store.shards_present() == set(range(5))
    assert int(store._open("gradients").version) == version  # nothing committed while logging
    got = _vectors_by_id(store)  # the read commits them: one version for the five shards
    assert store.gradients_version() == version + 1 and _staged(store) == []
    assert sorted(got) == list(range(20)) and all((got[i] == i // 4).all() for i in got)
    store.check_gradient_ids(20)
    assert store.commit_staged() is None  # nothing left to commit


def test_a_commit_whose_records_were_left_behind_appends_nothing_again(store):
    store.create_gradient_table(6)
    _stage(store, 0)
    _stage(store, 1)
    records = store._staged_records()
    version = store.commit_staged()
    for path, text in records.values():  # killed after the commit, before removing its records
        with open(path, "w") as f:
            f.write(text)
    assert store.shards_present() == {0, 1}
    assert store.commit_staged() == version  # every fragment already referenced: no commit
    store.check_gradient_ids(8)
    assert _staged(store) == []


def test_writer_killed_before_its_record_leaves_the_shard_absent_and_a_retry_stores_it_once(store, monkeypatch):
    store.create_gradient_table(6)
    _stage(store, 0)
    real = storage.store.os.replace
    monkeypatch.setattr(storage.store.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        _stage(store, 1)
    monkeypatch.setattr(storage.store.os, "replace", real)
    assert store.shards_present() == {0}  # its data files are written, but no record names them
    _stage(store, 1, value=7)
    store.check_gradient_ids(8)
    assert all((_vectors_by_id(store)[i] == 7).all() for i in range(4, 8))


def test_a_shard_staged_twice_or_rewritten_is_stored_once_with_the_last_rows(store):
    store.create_gradient_table(6)
    _stage(store, 0)
    _stage(store, 1, value=5)
    _stage(store, 1, value=6)  # a retried first attempt: its record replaced
    _stage(store, 2, value=1)
    ids, vecs = np.arange(8, 12), np.full((4, 6), 9, np.float32)
    store.write_gradient_shard(2, ids, vecs, "float32")  # a rewrite drops the staged copy
    store.check_gradient_ids(12)
    got = _vectors_by_id(store)
    assert all((got[i] == 6).all() for i in range(4, 8)) and all((got[i] == 9).all() for i in range(8, 12))


def test_reset_drop_and_shard_pruning_take_staged_shards_into_account(store):
    store.create_gradient_table(6)
    _stage(store, 0)
    store.reset_gradients()
    assert _staged(store) == [] and store.num_gradients() == 0  # emptied: the staged shard is gone too
    _stage(store, 0)
    _stage(store, 1)
    store.delete_shards_from(1)  # committed first, then pruned
    assert store.shards_present() == {0} and store.num_gradients() == 4
    _stage(store, 1)
    store.drop()
    assert _staged(store) == [] and store.shards_present() == set()


def test_an_object_store_index_appends_each_new_shard_at_once(store, monkeypatch):
    # No local directory to stage in (an s3:// or gs:// index): each new shard is its own commit.
    store.create_gradient_table(6)
    monkeypatch.setattr(store, "_staged_dir", lambda: None)
    version = store.gradients_version()
    _stage(store, 0)
    assert int(store._open("gradients").version) == version + 1 and store.shards_present() == {0}
