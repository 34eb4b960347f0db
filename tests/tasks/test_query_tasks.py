"""Query task bodies (`.fn`) and the shared index-model helpers, against a temporary LanceDB directory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataworth.attribution.scoring import Scorer
from dataworth.config import GenerationConfig, QuerySpec, ScoreConfig
from storage import IndexStore
from tasks.common import index_curvature, index_query_gradients, open_index_model
from tasks.index import publish_index
from tasks.query import Report, Scored, render_report, score_queries

QUERIES = [
    QuerySpec(id="cats", prompt="Tova keeps three", completion=" grey cats"),
    QuerySpec(id="gen", prompt="Bread is baked"),
]


@pytest.fixture
def published(stages, index_config):
    cfg = index_config(precondition="none")
    *_, manifest = stages.build(cfg)
    return cfg, publish_index.fn(cfg.index_uri, manifest).manifest


def test_open_index_model_and_query_gradients(published):
    cfg, manifest = published
    index = open_index_model(cfg.index_uri)
    assert index.manifest == manifest and index.projections is None
    assert type(index.model).__name__ == "GPT2LMHeadModel"
    encoded, grads = index_query_gradients(index, QUERIES, GenerationConfig(), 2)
    assert [q.id for q in encoded] == ["cats", "gen"] and not encoded[0].generated and encoded[1].generated
    assert grads.shape == (2, manifest.dim)
    fresh = open_index_model(IndexStore(cfg.index_uri), fresh=True)
    assert fresh.model is not index.model  # a private copy, safe to train
    with pytest.raises(ValueError, match="no published index"):
        open_index_model(cfg.index_uri + "-missing")


def test_score_queries_stores_top_k_of_every_mode(published, tmp_path):
    cfg, manifest = published
    score = ScoreConfig(top_k=3, query_batch_size=1)
    matrix = tmp_path / "m" / "score-matrix.npz"
    scored = score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GenerationConfig(), str(matrix))
    assert isinstance(scored, Scored) and scored.queries == 2
    assert scored.pairs > 0 and scored.compute_seconds == scored.query_gradient_seconds + scored.score_seconds
    assert set(scored.metrics()) == {
        "queries",
        "query_gradient_seconds",
        "score_seconds",
        "score_pairs_per_s",
        "score_pairs",
    }
    store = IndexStore(cfg.index_uri)
    scores = store.read_scores(scored.score_run_id).to_pylist()
    assert len(scores) == len(score.modes) * 2 * 3
    assert {r["index_version"] for r in scores} == {manifest.gradients_version}
    queries = {q["query_id"]: q for q in store.read_queries(scored.score_run_id).to_pylist()}
    assert queries["gen"]["generated"] and not queries["cats"]["generated"]

    # The stored top-k equal an in-memory scoring of the same gradients.
    index = open_index_model(store)
    _, grads = index_query_gradients(index, QUERIES, GenerationConfig(), 1)
    scorer = Scorer(grads, index_curvature(store, manifest, None), ["influence"], top_k=3)
    for ids, vectors, _ in store.iter_gradients(100):
        scorer.update(torch.tensor(ids), torch.tensor(vectors))
    cats = sorted((r for r in scores if r["mode"] == "influence" and r["query_id"] == "cats"), key=lambda r: r["rank"])
    assert [r["example_id"] for r in cats] == scorer.topk["influence"].ids[0].tolist()
    full = np.load(matrix)
    assert full["influence"].shape == (2, manifest.num_examples) and full["query_ids"].tolist() == ["cats", "gen"]

    again = score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GenerationConfig())
    assert again.score_run_id == scored.score_run_id  # the same run is rewritten, not duplicated
    assert store.read_scores(scored.score_run_id).num_rows == len(scores)


def test_render_report_writes_html_and_csv(published, tmp_path):
    cfg, manifest = published
    scored = score_queries.fn(cfg.index_uri, manifest, QUERIES, ScoreConfig(top_k=2), GenerationConfig())
    report = render_report.fn(
        cfg.index_uri, scored.score_run_id, str(tmp_path / "r"), "title", {"index": cfg.index_uri}, {"cats": ["d1"]}
    )
    assert isinstance(report, Report) and report.files == [report.report, report.topk_csv]
    html = open(report.report).read()
    assert "grey cats" in html and "Bread is baked" in html
    lines = open(report.topk_csv).read().splitlines()
    assert lines[0] == '"mode","query_id","rank","score","example_id","document_id","source","relevant"'
    assert len(lines) == 1 + len(ScoreConfig().modes) * 2 * 2
