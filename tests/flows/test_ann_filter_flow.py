"""`dataworth index --ann.build`, then a query of hybrid-ann-* modes under a metadata filter, end to end under the
real Prefect engine: the manifest records the vector index, the top-k CSV keeps its columns, the recall against
the exact mode and the examples kept reach the query's MLflow run; a re-index without --ann.build on an index that
has none is refused at query time naming the fix."""

import csv

import pytest
from mlflow import MlflowClient
from tiny import TINY_CORPUS, tiny_index_config, write_tiny_assets

from dataworth.config import AnnConfig, QueryConfig, QuerySpec, ScoreConfig, TrackingConfig
from storage import IndexStore


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_index_with_ann_then_a_filtered_ann_query(harness, tmp_path):
    from flows.index import index_flow
    from flows.query import query_flow

    assets = write_tiny_assets(tmp_path / "assets", TINY_CORPUS)
    cfg = tiny_index_config(assets, tmp_path).model_copy(update={"ann": AnnConfig(build=True)})
    index_flow(cfg, progress=False)
    manifest = IndexStore(cfg.index_uri).read_manifest()
    assert manifest.ann_index["index_type"] == "IVF_RQ" and manifest.ann_index["rows"] == manifest.num_examples

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    documents = ["d1", "d3", "d4"]
    score = ScoreConfig(
        modes=["influence", "hybrid-ann-influence", "hybrid-ann-cosine"],
        top_k=2,
        candidates=manifest.num_examples,
        where_document=documents,
    )
    query = QueryConfig(
        index_uri=cfg.index_uri,
        queries=[QuerySpec(id="cats", prompt="Tova keeps three", completion=" grey cats")],
        score=score,
        report_dir=str(tmp_path / "reports"),
        tracking=TrackingConfig(tracking_uri=uri, experiment="ann"),
    )
    out = query_flow(query)
    with open(out["topk_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["mode", "query_id", "rank", "score"] and "document_id" in rows[0]
    assert {r["mode"] for r in rows} == set(score.modes) and len(rows) == 3 * 2
    assert {r["document_id"] for r in rows} <= set(documents)
    exact = [r["document_id"] for r in rows if r["mode"] == "influence"]
    assert [r["document_id"] for r in rows if r["mode"] == "hybrid-ann-influence"] == exact

    metrics = MlflowClient(uri).get_run(out["mlflow_run_id"]).data.metrics
    assert metrics["recall_at_2.hybrid-ann-influence"] == 1.0
    kept = IndexStore(cfg.index_uri).example_ids_where(manifest.examples_version, documents=documents)
    assert metrics["examples_scored"] == len(kept) < manifest.num_examples

    # An index published without a vector index: the ANN query is refused, naming the flag that builds one.
    plain = tiny_index_config(assets, tmp_path / "plain")
    index_flow(plain, progress=False)
    with pytest.raises(ValueError, match=r"has no vector index.*--ann.build"):
        query_flow(query.model_copy(update={"index_uri": plain.index_uri}))
