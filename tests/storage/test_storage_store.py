"""IndexStore against a real LanceDB directory (tmp_path): no mocks."""

from __future__ import annotations

import json
import os

import lancedb
import numpy as np
import pyarrow as pa
import pytest
import torch

from storage import SCHEMA_VERSION, IndexManifest, IndexState, IndexStore, IndexStoreError
from storage.schemas import examples_schema
from storage.store import MANIFEST_KEY


def _manifest(**update) -> IndexManifest:
    return IndexManifest.model_validate(
        {
            "config": {"model": {"name_or_path": "m"}, "data": {"dataset": "d"}, "logging": {}, "curvature": {}}
            | {"index_uri": "idx"},
            "model_fingerprint": "mfp",
            "data_fingerprint": "dfp",
            "layout": [],
            "dim": 4,
            "full_gradient_params": 64,
            "num_examples": 4,
            "num_documents": 2,
            "num_tokens": 16,
            "examples_version": 1,
            "gradients_version": 3,
            "curvature_artifact": "curvature-x",
            **update,
        }
    )


@pytest.fixture
def store(tmp_path):
    return IndexStore(str(tmp_path / "index"))


def _examples(n: int, offset: int = 0) -> pa.Table:
    ids = np.arange(offset, offset + n)
    return pa.table(
        {
            "example_id": ids,
            "document_id": [f"doc{i // 2}" for i in ids],
            "chunk_index": ids % 2,
            "token_start": (ids % 2) * 4,
            "token_end": (ids % 2) * 4 + 4,
            "num_tokens": np.full(n, 4),
            "text": [f"text {i}" for i in ids],
            "source": [None] * n,
            "input_ids": [[int(i), 1, 2, 3] for i in ids],
        }
    )


def _vectors(ids, dim=6, seed=0):
    return np.random.default_rng(seed).standard_normal((len(ids), dim)).astype(np.float32)


def _read_all(store, **kwargs):
    ids, vecs, norms = zip(*store.iter_gradients(**kwargs))
    ids, vecs, norms = np.concatenate(ids), np.concatenate(vecs), np.concatenate(norms)
    order = np.argsort(ids)
    return ids[order], vecs[order], norms[order]


def _scores(run_id: str, n: int) -> pa.Table:
    return pa.table(
        {
            "run_id": [run_id] * n,
            "query_id": ["q0"] * n,
            "example_id": np.arange(n),
            "score": np.linspace(1, 0, n),
            "rank": np.arange(n),
            "mode": ["dot"] * n,
            "index_version": np.full(n, 3),
        }
    )


# ---- examples ------------------------------------------------------------------------------


def test_examples_round_trip_and_versions(store):
    v1 = store.write_examples(_examples(5))
    v2 = store.write_examples(_examples(3, offset=10))
    assert v2 > v1 and v2 == store.examples_version()
    assert store.num_examples() == 3
    assert store.read_examples(["example_id", "text"]).to_pydict() == {
        "example_id": [10, 11, 12],
        "text": ["text 10", "text 11", "text 12"],
    }
    assert store.read_examples(["text"], where="example_id IN (10, 12)").column("text").to_pylist() == [
        "text 10",
        "text 12",
    ]
    old = store.read_examples(version=v1)
    assert old.num_rows == 5 and old.schema.names == examples_schema().names
    assert store.num_examples(version=v1) == 5


def test_examples_errors(store):
    with pytest.raises(IndexStoreError, match=r"missing \['text'\]"):
        store.write_examples(_examples(3).drop_columns(["text"]))
    with pytest.raises(IndexStoreError, match=r"unexpected \['extra'\]"):
        store.write_examples(_examples(3).append_column("extra", pa.array([1, 2, 3])))
    with pytest.raises(IndexStoreError, match="no 'examples' table"):
        store.read_examples()
    store.write_examples(_examples(3))
    with pytest.raises(IndexStoreError, match=r"unknown examples columns \['nope'\]"):
        store.read_examples(["nope"])
    with pytest.raises(IndexStoreError, match="has no version 99"):
        store.read_examples(version=99)


# ---- gradients -----------------------------------------------------------------------------


def test_shard_rewrite_is_idempotent_and_rewrite_wins(store):
    ids0, ids1 = np.arange(0, 5), np.arange(5, 8)
    store.write_gradient_shard(0, ids0, _vectors(ids0, seed=0), "float32")
    store.write_gradient_shard(1, ids1, _vectors(ids1, seed=1), "float32")
    rewrite = _vectors(ids0, seed=2)
    store.write_gradient_shard(0, ids0, rewrite, "float32")
    store.write_gradient_shard(0, ids0, rewrite, "float32")
    assert store.num_gradients() == 8
    assert store.shards_present() == {0, 1}
    ids, vecs, norms = _read_all(store, batch_size=100)
    np.testing.assert_array_equal(ids, np.arange(8))
    np.testing.assert_array_equal(vecs[:5], rewrite)
    np.testing.assert_array_equal(vecs[5:], _vectors(ids1, seed=1))
    np.testing.assert_allclose(norms, (vecs.astype(np.float64) ** 2).sum(1), rtol=1e-6)


def test_shard_rewrite_with_fewer_rows_drops_the_rest(store):
    store.write_gradient_shard(0, np.arange(4), _vectors(range(4)), "float32")
    store.write_gradient_shard(1, np.arange(4, 6), _vectors(range(2)), "float32")
    store.write_gradient_shard(0, np.arange(2), _vectors(range(2)), "float32")
    ids, _, _ = _read_all(store, batch_size=10)
    np.testing.assert_array_equal(ids, [0, 1, 4, 5])


def test_delete_shards_from_and_state(store):
    empty = store.state()
    assert isinstance(empty, IndexState)
    assert empty.manifest is None and not empty.has_examples and empty.shards == []
    assert store.delete_shards_from(1) is None
    store.write_examples(_examples(6))
    for shard in range(3):
        store.write_gradient_shard(shard, np.arange(2 * shard, 2 * shard + 2), _vectors(range(2)), "float32")
    version = store.delete_shards_from(1)
    assert version == store.gradients_version() and store.shards_present() == {0}
    state = store.state()
    assert state.has_examples and state.num_examples == 6 and state.shards == [0]
    assert state.num_gradients == 2 and state.gradients_version == version
    with pytest.raises(IndexStoreError, match="first_shard must be a non-negative int"):
        store.delete_shards_from(-1)


def test_float16_round_trip_keeps_float32_norm(store):
    ids = np.arange(20)
    vecs = _vectors(ids, dim=8) * 3
    store.write_gradient_shard(0, ids, vecs, "float16")
    assert (store.gradient_dim(), store.gradient_dtype()) == (8, "float16")
    got_ids, got, norms = _read_all(store, batch_size=7)
    assert got.dtype == np.float32 and norms.dtype == np.float32
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got, vecs, rtol=1e-3, atol=1e-3)
    exact = (vecs.astype(np.float64) ** 2).sum(1)
    np.testing.assert_allclose(norms, exact, rtol=1e-6)
    # The stored norm is the float32 one, not the norm of the rounded float16 vector.
    assert not np.allclose(norms, (vecs.astype(np.float16).astype(np.float64) ** 2).sum(1), rtol=1e-7, atol=0)


def test_bfloat16_store_rounds_as_torch_does(store):
    ids = np.arange(30)
    vecs = _vectors(ids, dim=16) * np.logspace(-15, 15, 30, dtype=np.float32)[:, None]
    vecs[0, :3] = [0.0, -0.0, 1.0 + 2.0**-8]  # exact zeros and a tie (rounds to even: 1.0)
    store.write_gradient_shard(0, ids, vecs, "bfloat16")
    assert (store.gradient_dim(), store.gradient_dtype()) == (16, "bfloat16")
    got_ids, got, norms = _read_all(store, batch_size=7)
    np.testing.assert_array_equal(got_ids, ids)
    want = torch.from_numpy(vecs).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(got, want)
    assert got[0, 2] == 1.0
    np.testing.assert_allclose(norms, (vecs.astype(np.float64) ** 2).sum(1), rtol=1e-6)  # of the unrounded rows


def test_int8_store_keeps_each_row_within_half_a_step(store):
    ids = np.arange(25)
    vecs = _vectors(ids, dim=32) * np.logspace(-15, 15, 25, dtype=np.float32)[:, None]
    vecs[3] = 0.0  # a zero row: scale 0, decoded as zeros
    for shard, lo in enumerate(range(0, 25, 10)):
        store.write_gradient_shard(shard, ids[lo : lo + 10], vecs[lo : lo + 10], "int8")
    assert store.gradient_dtype() == "int8"
    got_ids, got, _ = _read_all(store, batch_size=4)
    np.testing.assert_array_equal(got_ids, ids)
    step = np.abs(vecs).max(axis=1, keepdims=True) / 127
    assert (np.abs(got - vecs) <= 0.5 * step * (1 + 1e-6)).all()
    np.testing.assert_array_equal(got[3], 0.0)
    # each row's largest value is stored exactly as ±127 steps
    rows = np.arange(25)
    big = np.abs(vecs).argmax(axis=1)
    np.testing.assert_allclose(got[rows, big], vecs[rows, big], rtol=1e-6)
    by_id, _ = store.read_gradients_by_id(np.array([7, 3, 7]), store.gradients_version())
    np.testing.assert_array_equal(by_id, got[[7, 3, 7]])


def test_compact_dtypes_store_fewer_bytes(tmp_path):
    ids = np.arange(2000)
    vecs = _vectors(ids, dim=256)
    sizes = {}
    for dtype in ("float32", "bfloat16", "int8"):
        s = IndexStore(str(tmp_path / dtype))
        s.write_gradient_shard(0, ids, vecs, dtype)
        sizes[dtype] = s.bytes_stored()
    assert sizes["bfloat16"] < 0.56 * sizes["float32"]
    assert sizes["int8"] < 0.31 * sizes["float32"]


def test_streaming_reader_batches_versions_and_shards(store):
    for shard in range(3):
        ids = np.arange(shard * 20, shard * 20 + 20)
        store.write_gradient_shard(shard, ids, _vectors(ids, seed=shard), "float32")
        if shard == 0:
            first = store.gradients_version()
    batches = list(store.iter_gradients(batch_size=7))
    assert len(batches) >= 9 and all(len(b[0]) <= 7 for b in batches)
    for ids, vecs, norms in batches:
        assert ids.dtype == np.int64 and vecs.shape == (len(ids), 6) and norms.shape == (len(ids),)
    ids, vecs, _ = _read_all(store, batch_size=7)
    np.testing.assert_array_equal(ids, np.arange(60))
    np.testing.assert_array_equal(vecs[20:40], _vectors(np.arange(20), seed=1))

    old_ids, _, _ = _read_all(store, batch_size=7, version=first)
    np.testing.assert_array_equal(old_ids, np.arange(20))
    assert store.num_gradients(version=first) == 20 and store.num_gradients() == 60

    some, _, _ = _read_all(store, batch_size=7, shards=[0, 2])
    np.testing.assert_array_equal(some, np.r_[0:20, 40:60])


def test_gradient_input_errors(store):
    ids = np.arange(4)
    store.write_gradient_shard(0, ids, _vectors(ids, dim=6), "float32")
    with pytest.raises(IndexStoreError, match="dim 5.*stores float32 of dim 6.*overwrite=True"):
        store.write_gradient_shard(1, ids + 4, _vectors(ids, dim=5), "float32")
    with pytest.raises(IndexStoreError, match="float16 vectors of dim 6.*overwrite=True"):
        store.write_gradient_shard(1, ids + 4, _vectors(ids, dim=6), "float16")
    bad = _vectors(ids)
    bad[1, 2], bad[3, 0] = np.nan, np.inf
    with pytest.raises(IndexStoreError, match=r"shard 7: non-finite .* example_ids \[11, 13\]"):
        store.write_gradient_shard(7, ids + 10, bad, "float32")
    with pytest.raises(IndexStoreError, match="3 example_ids for 4 vectors"):
        store.write_gradient_shard(1, ids[:3], _vectors(ids), "float32")
    with pytest.raises(IndexStoreError, match="must be a non-empty 2-D array"):
        store.write_gradient_shard(1, ids, np.ones(4, np.float32), "float32")
    with pytest.raises(IndexStoreError, match=r"duplicate example_ids \[5\]"):
        store.write_gradient_shard(1, np.array([4, 5, 5, 6]), _vectors(ids), "float32")
    with pytest.raises(IndexStoreError, match="exceed the float16 range"):
        IndexStore(store.uri + "_f16").write_gradient_shard(0, ids, _vectors(ids) * 1e5, "float16")
    with pytest.raises(IndexStoreError, match="batch_size must be a positive int"):
        store.iter_gradients(batch_size=0)
    with pytest.raises(IndexStoreError, match="no 'gradients' table"):
        IndexStore(store.uri + "_empty").iter_gradients(batch_size=4)
    assert store.num_gradients() == 4


def test_foreign_and_corrupt_gradients_tables(tmp_path):
    uri = str(tmp_path / "foreign")
    lancedb.connect(uri).create_table("gradients", data=pa.table({"id": [1], "emb": [[0.1, 0.2]]}))
    store = IndexStore(uri)
    with pytest.raises(IndexStoreError, match="'gradients'.*overwrite=True"):
        store.num_gradients()
    with pytest.raises(IndexStoreError, match="'gradients'.*overwrite=True"):
        store.write_gradient_shard(0, np.arange(2), _vectors(range(2)), "float32")
    store.drop()
    store.write_gradient_shard(0, np.arange(2), _vectors(range(2)), "float32")
    assert store.num_gradients() == 2

    corrupt = tmp_path / "corrupt"
    (corrupt / "gradients.lance" / "_versions").mkdir(parents=True)
    (corrupt / "gradients.lance" / "_versions" / "1.manifest").write_bytes(b"garbage")
    with pytest.raises(IndexStoreError, match="table 'gradients' .* cannot be opened.*overwrite=True"):
        IndexStore(str(corrupt)).gradient_dim()


# ---- artifacts and manifest ----------------------------------------------------------------


def test_manifest_round_trip_and_artifacts(store):
    assert not store.exists() and store.read_manifest() is None and store.read_artifact("curvature") is None
    store.write_artifact("curvature", b"\x00blob")
    store.write_artifact("curvature", b"\x01new")
    assert store.read_artifact("curvature") == b"\x01new"
    manifest = _manifest(calibration={"damping_factor": 0.5, "sweep": {"0.5": {"tune": 1.0}}})
    store.publish_manifest(manifest)
    assert store.exists()
    published = store.read_manifest()
    assert isinstance(published, IndexManifest) and published.schema_version == SCHEMA_VERSION
    assert published.published_at is not None  # stamped on first publication
    assert published == manifest.model_copy(update={"published_at": published.published_at})
    # Republishing (e.g. with a calibration) keeps the first publication time.
    store.publish_manifest(published.model_copy(update={"calibration": None}))
    assert store.read_manifest().published_at == published.published_at
    with pytest.raises(IndexStoreError, match="reserved"):
        store.write_artifact(MANIFEST_KEY, b"{}")
    with pytest.raises(IndexStoreError, match="must be an IndexManifest"):
        store.publish_manifest({"gradients_version": 3})


def test_manifest_schema_version_mismatch(store):
    with pytest.raises(ValueError, match="schema_version 2"):
        _manifest(schema_version=2)
    store._put(MANIFEST_KEY, json.dumps({"schema_version": 0}).encode())  # an index from an older dataworth
    assert store.exists()
    with pytest.raises(IndexStoreError, match="schema version 0, this dataworth reads version 1.*overwrite=True"):
        store.read_manifest()
    store._put(MANIFEST_KEY, json.dumps({"schema_version": SCHEMA_VERSION, "dim": 4}).encode())
    with pytest.raises(IndexStoreError, match="does not read as an index manifest"):
        store.read_manifest()


# ---- scoring runs --------------------------------------------------------------------------


def test_scores_and_queries_rewrite_per_run(store):
    assert store.read_scores().num_rows == 0
    store.write_scores("a", _scores("a", 3))
    store.write_scores("b", _scores("b", 2))
    store.write_scores("a", _scores("a", 1))
    assert store.read_scores("a").num_rows == 1 and store.read_scores("b").num_rows == 2
    assert store.read_scores().num_rows == 3
    with pytest.raises(IndexStoreError, match=r"also carry run_id values \['b'\]"):
        store.write_scores("a", _scores("b", 1))
    with pytest.raises(IndexStoreError, match=r"missing \['index_version'\]"):
        store.write_scores("a", _scores("a", 1).drop_columns(["index_version"]))

    queries = pa.table(
        {
            "run_id": ["a"],
            "query_id": ["q0"],
            "prompt": ["p"],
            "completion": [" c"],
            "generated": [True],
            "num_completion_tokens": [1],
        }
    )
    store.write_queries("a", queries)
    store.write_queries("a", queries)
    assert store.read_queries("a").to_pylist() == queries.to_pylist()


# ---- housekeeping --------------------------------------------------------------------------


def test_drop_and_bytes_stored(store):
    assert store.bytes_stored() == 0 and not os.path.exists(store.uri)  # reads create nothing
    store.write_examples(_examples(4))
    store.write_gradient_shard(0, np.arange(4), _vectors(range(4)), "float32")
    store.write_scores("a", _scores("a", 2))
    store.publish_manifest(_manifest())
    assert store.bytes_stored() > 0
    store.drop()
    assert not store.exists() and store.shards_present() == set()
    assert lancedb.connect(store.uri).list_tables().tables == []
    store.write_gradient_shard(0, np.arange(4), _vectors(range(4), dim=3), "float16")
    assert store.gradient_dim() == 3


def test_non_local_uri_uses_lance_stats(tmp_path):
    store = IndexStore(f"memory://{tmp_path.name}")
    store.write_gradient_shard(0, np.arange(4), _vectors(range(4), dim=8), "float16")
    store.publish_manifest(_manifest())
    assert store.exists() and store.num_gradients() == 4
    assert store.bytes_stored() >= 4 * 8 * 2


def test_reset_gradients_keeps_the_pinned_version_readable_until_cleanup(store):
    from datetime import timedelta

    store.write_examples(_examples(4))
    ids = np.arange(4)
    old = store.write_gradient_shard(0, ids, _vectors(ids))
    emptied = store.reset_gradients()
    assert emptied > old and store.num_gradients() == 0
    # A rebuild with another layout: the emptied table takes the new dim as one more version.
    new = store.write_gradient_shard(0, ids, _vectors(ids, dim=3))
    assert store.gradient_dim() == 3
    pinned = _read_all(store, batch_size=10, version=old)  # what a query of the published manifest reads meanwhile
    assert pinned[1].shape == (4, 6) and np.array_equal(pinned[1], _vectors(ids))
    with pytest.raises(IndexStoreError, match="same dim|dim"):
        store.write_gradient_shard(1, np.arange(4, 6), _vectors(np.arange(2), dim=5))  # a non-empty table: refused
    assert store.cleanup_versions(timedelta(0)) > 0
    with pytest.raises(IndexStoreError, match="has no version"):
        list(store.iter_gradients(10, version=old))
    assert _read_all(store, batch_size=10, version=new)[1].shape == (4, 3)


def test_previous_examples_and_gradient_rows_of_an_older_version(store):
    """What an incremental run reads: a shard's documents in the published examples version (through the
    document_id index), and their stored rows, in the order asked, from the shards that hold them."""
    v1 = store.write_examples(_examples(6))  # doc0: ids 0, 1; doc1: 2, 3; doc2: 4, 5
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 4)).astype(np.float32)
    store.write_gradient_shard(0, np.arange(4), vectors[:4])
    g1 = store.write_gradient_shard(1, np.arange(4, 6), vectors[4:], sq_norms=np.array([7.0, 8.0]))
    store.write_examples(_examples(2, offset=100))  # a newer version does not hide the old one
    old = store.previous_examples(v1, ["doc2", "doc0", "doc9"]).to_pydict()
    assert sorted(zip(old["example_id"], old["document_id"])) == [(0, "doc0"), (1, "doc0"), (4, "doc2"), (5, "doc2")]
    assert old["input_ids"][old["example_id"].index(4)] == [4, 1, 2, 3]
    assert store.previous_examples(v1, []).num_rows == 0
    names = [i.name for i in store._open("examples").list_indices()]
    assert "document_idx" in names

    ids, got, sq = store.read_gradient_rows(np.array([5, 0, 3, 0]), g1, shards=[1, 0])  # 0 twice: repeated chunks
    assert ids.tolist() == [5, 0, 3, 0]
    np.testing.assert_array_equal(got, vectors[[5, 0, 3, 0]])
    np.testing.assert_allclose(sq[1:], np.square(vectors[[0, 3, 0]]).sum(axis=1), rtol=1e-6)
    assert sq[0] == 8.0  # a given sq_norm is stored as given
    with pytest.raises(IndexStoreError, match=r"no rows for example_ids \[4\]"):
        store.read_gradient_rows(np.array([4]), g1, shards=[0])
    with pytest.raises(IndexStoreError, match="sq_norms must be 2 finite values"):
        store.write_gradient_shard(2, np.arange(6, 8), vectors[:2], sq_norms=np.array([1.0]))


def test_every_published_version_can_be_read_back(store):
    store.write_examples(_examples(4))
    store.write_gradient_shard(0, np.arange(4), np.ones((4, 4), np.float32))
    first = _manifest(gradients_version=store.gradients_version(), examples_version=store.examples_version())
    store.publish_manifest(first)
    store.write_gradient_shard(0, np.arange(4), np.full((4, 4), 2.0, np.float32))
    second = _manifest(gradients_version=store.gradients_version(), examples_version=store.examples_version())
    store.publish_manifest(second)
    assert store.published_versions() == [first.gradients_version, second.gradients_version]
    assert store.read_manifest().gradients_version == second.gradients_version
    assert store.read_manifest(first.gradients_version).gradients_version == first.gradients_version
    with pytest.raises(IndexStoreError, match="no published version 99; its versions are"):
        store.read_manifest(99)
    with pytest.raises(IndexStoreError, match="reserved"):
        store.write_artifact(f"manifest-v{first.gradients_version}.json", b"x")
    # The retention window removes the first version's files: it is listed, but says it is gone.
    from datetime import timedelta

    store.cleanup_versions(timedelta(0))
    with pytest.raises(IndexStoreError, match="removed by the retention window"):
        store.read_manifest(first.gradients_version)


def test_examples_without_label_mask_read_as_a_loss_on_every_token(store):
    """An examples table written before the label_mask column (data.prompt_column) existed is still read: every
    example's label_mask is null (every label counts), which is how its gradients were logged. New tables store
    the column."""
    from storage.schemas import legacy_examples_schema

    legacy = _examples(4).cast(legacy_examples_schema())
    db = lancedb.connect(store.uri)
    db.create_table("examples", data=legacy, schema=legacy_examples_schema())
    assert store.read_examples(["example_id", "label_mask"]).to_pydict() == {
        "example_id": [0, 1, 2, 3],
        "label_mask": [None] * 4,
    }
    whole = store.read_examples(where="example_id >= 2")
    assert whole.schema.names == examples_schema().names and whole.column("label_mask").to_pylist() == [None, None]
    assert store.read_examples(["text"]).schema.names == ["text"]
    legacy_version = store.examples_version()
    assert store.previous_examples(legacy_version, ["doc1"]).column("label_mask").null_count == 2
    # written now: the column is stored (filled with 0 when the table has none)
    masks = [[False, True, True, True], None]
    store.write_examples(_examples(2).append_column("label_mask", pa.array(masks, pa.list_(pa.bool_()))))
    assert store.read_examples(["label_mask"]).column("label_mask").to_pylist() == masks
    assert "label_mask" in lancedb.connect(store.uri).open_table("examples").schema.names
    # an upgraded index's first incremental run reads the version before the column beside the one after it
    old = store.previous_examples(legacy_version, ["doc0", "doc1"]).to_pydict()
    assert old["example_id"] == [0, 1, 2, 3] and old["label_mask"] == [None] * 4
    assert store.read_examples(["example_id"], version=legacy_version).num_rows == 4
