"""Rebuilds without downtime: `--overwrite` of a published index builds the new version beside the old one;
queries read the old version until the new manifest is published, then the new one, never an error. A damaged
index is replaced whole by `--overwrite`."""

import glob
import json

import pytest
from tiny import TINY_CORPUS, tiny_index_config, write_tiny_assets

from dataworth.config import CurvatureConfig, DataConfig, QueryConfig, QuerySpec, ScoreConfig
from dataworth.errors import ConfigError
from storage import IndexStore, IndexStoreError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

QUERY = QuerySpec(id="cats", prompt="Tova keeps three", completion=" grey cats")
# The rebuild's corpus: other documents, so the answers of the two versions differ.
NEW_CORPUS = [f"Report {i}: the ferry to Osk leaves at {i} in the morning." for i in range(10)]


def answers(uri: str, tracking, top_k: int) -> list[tuple[str, str, int, str, str]]:
    """(mode, query, rank, document id, text) of a fresh query run (top_k varies so no cached run answers)."""
    from flows.query import query_flow
    from storage import load_results

    out = query_flow(QueryConfig(index_uri=uri, queries=[QUERY], score=ScoreConfig(top_k=top_k), tracking=tracking))
    manifest = IndexStore(uri).read_manifest()
    _, results = load_results(uri, out["score_run_id"], examples_version=manifest.examples_version)
    return sorted(
        (mode, q, r["rank"], r["document_id"], r["text"])
        for mode, bq in results.items()
        for q, rows in bq.items()
        for r in rows
    )


def test_overwrite_builds_beside_the_published_version(harness, tmp_path):
    from flows.index import index_flow

    assets = write_tiny_assets(tmp_path, TINY_CORPUS)
    cfg = tiny_index_config(assets, tmp_path)
    index_flow(cfg, progress=False)
    old = answers(cfg.index_uri, cfg.tracking, top_k=3)
    assert old and all(r[3].startswith("d") for r in old)
    top3 = max(r[2] for r in old)
    old_dim = IndexStore(cfg.index_uri).read_manifest().dim

    (tmp_path / "new.jsonl").write_text(
        "".join(json.dumps({"id": f"n{i}", "text": t}) + "\n" for i, t in enumerate(NEW_CORPUS))
    )
    rebuild = cfg.model_copy(
        update={
            "overwrite": True,
            "data": DataConfig(dataset=str(tmp_path / "new.jsonl"), id_column="id", max_length=16),
            "logging": cfg.logging.model_copy(update={"proj_dim_in": 3, "proj_dim_out": 3}),  # another layout too
        }
    )
    # A rebuild that stops before publishing (its curvature is refused after every shard is logged): the
    # examples and gradients tables now hold the new corpus, the manifest is still the old one.
    broken = rebuild.model_copy(update={"curvature": CurvatureConfig(kind="raw", max_block_dim=4)})
    with pytest.raises(ConfigError):
        index_flow(broken, progress=False)
    store = IndexStore(cfg.index_uri)
    assert store.num_gradients() == store.num_examples() > 0  # the new version is there, unpublished
    assert {d for d in store.read_examples(columns=["document_id"]).column("document_id").to_pylist()} == {
        f"n{i}" for i in range(len(NEW_CORPUS))
    }
    # A query now (top-5: not served from the cache, so scored afresh) answers from the published version:
    # its first three ranks are exactly the old top-3, with the old documents' text.
    during = answers(cfg.index_uri, cfg.tracking, top_k=5)
    assert [r for r in during if r[2] <= top3] == old

    index_flow(rebuild, progress=False)
    new = answers(cfg.index_uri, cfg.tracking, top_k=3)
    assert new != old and all(r[3].startswith("n") for r in new)
    assert IndexStore(cfg.index_uri).read_manifest().dim == old_dim // 16 * 9  # 4×4 → 3×3 per tracked layer


def test_overwrite_replaces_a_damaged_index(harness, tmp_path):
    from flows.index import index_flow

    assets = write_tiny_assets(tmp_path, TINY_CORPUS)
    cfg = tiny_index_config(assets, tmp_path)
    index_flow(cfg, progress=False)
    old = answers(cfg.index_uri, cfg.tracking, top_k=3)
    for f in glob.glob(str(tmp_path / "index" / "artifacts.lance" / "_versions" / "*")):
        with open(f, "wb") as fh:
            fh.write(b"damaged")
    with pytest.raises(IndexStoreError, match="cannot be opened") as err:
        index_flow(cfg, progress=False)
    assert "--overwrite" in err.value.fix
    index_flow(cfg.model_copy(update={"overwrite": True}), progress=False)
    assert answers(cfg.index_uri, cfg.tracking, top_k=3) == old
