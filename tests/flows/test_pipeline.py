"""index + query flows end to end under a real Prefect engine, LanceDB directory and MLflow store."""

import json

import numpy as np
import pytest
import torch
from flowstates import task_states
from tiny import TINY_CORPUS, tiny_index_config, write_tiny_assets, write_tiny_queries

from dataworth.attribution.curvature import Curvature
from dataworth.attribution.gradients import query_gradients
from dataworth.attribution.projection import FittedProjections
from dataworth.attribution.scoring import Scorer
from dataworth.config import (
    GenerationConfig,
    IndexConfig,
    ModelConfig,
    QueryConfig,
    ScoreConfig,
)
from dataworth.queries import encode_queries
from storage import IndexStore, results_store

pytestmark = pytest.mark.slow

TEXTS = TINY_CORPUS


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = write_tiny_assets(tmp_path_factory.mktemp("pipeline"), TEXTS)
    write_tiny_queries(root / "queries.jsonl")
    return root


def index_config(assets, **logging):
    return tiny_index_config(assets, assets, **logging)


def test_index_then_query(harness, assets):
    from mlflow import MlflowClient

    from flows.index import index_flow
    from flows.query import query_flow

    cfg = index_config(assets)
    out = index_flow(cfg, progress=False)
    store = IndexStore(cfg.index_uri)
    n = store.num_examples()
    assert n > len(TEXTS)  # the long document was chunked
    assert out["examples"] == n and store.num_gradients() == n
    assert out["shards"] == (n + 3) // 4
    manifest = store.read_manifest()
    assert manifest.dim == out["dim"] == store.gradient_dim()

    qcfg = QueryConfig(
        index_uri=cfg.index_uri,
        queries_path=str(assets / "queries.jsonl"),
        score=ScoreConfig(top_k=3, query_batch_size=1),
        tracking=cfg.tracking,
    )
    q = query_flow(qcfg)
    results = results_store(cfg.index_uri)  # beside the index: a query never writes the published tables
    assert q["results_uri"] == results.uri
    scores = results.read_scores(q["score_run_id"])
    assert scores.num_rows == 2 * 4 * 3
    queries = {r["query_id"]: r for r in results.read_queries(q["score_run_id"]).to_pylist()}
    assert queries["gen"]["generated"] and queries["gen"]["completion"]
    assert not queries["cats"]["generated"]
    html = open(q["report"]).read()
    assert "grey cats" in html and "Bread is baked" in html
    assert "No results for this query" not in html
    top_doc = store.read_examples(where=f"example_id = {scores['example_id'][0].as_py()}")["text"][0].as_py()
    assert top_doc[:20] in html  # the ranked training text is in the report

    # The stored scores equal a direct in-memory computation over the same gradients.
    from dataworth.model import load_model
    from dataworth.queries import load_queries

    model, tok = load_model(ModelConfig(name_or_path=str(assets / "model")))
    # (the query with a given completion: a generated one is kept as token ids, not re-tokenizable text)
    specs = [s for s in load_queries(qcfg.queries_path) if s.id == "cats"]
    enc = encode_queries(model, tok, specs, qcfg.generation, 64)
    assert manifest.projections_artifact  # the default logging config whitens with KFAC factors
    fitted = FittedProjections.from_bytes(store.read_artifact(manifest.projections_artifact))
    g_q = query_gradients(model, enc, cfg.logging, tok.pad_token_id, 2, fitted)
    curv = Curvature.from_bytes(store.read_artifact(manifest.curvature_artifact))
    ids, vecs = zip(*[(i, v) for i, v, _ in store.iter_gradients(100)])
    scorer = Scorer(g_q, curv, ["influence"], top_k=3)
    scorer.update(torch.from_numpy(np.concatenate(ids)), torch.tensor(np.concatenate(vecs)))
    got = sorted(
        (r for r in scores.to_pylist() if r["mode"] == "influence" and r["query_id"] == "cats"), key=lambda r: r["rank"]
    )
    assert [r["example_id"] for r in got] == scorer.topk["influence"].ids[0].tolist()
    assert torch.allclose(
        torch.tensor([r["score"] for r in got], dtype=torch.float64), scorer.topk["influence"].scores[0], rtol=1e-4
    )

    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert {"compression_ratio", "bytes_stored", "log_tokens_per_s", "peak_memory_mb"} <= set(run.data.metrics)
    assert run.data.params["logging.projection"] == "gaussian"
    qrun = client.get_run(q["mlflow_run_id"])
    assert "score_pairs_per_s" in qrun.data.metrics
    assert any(a.path.endswith(".html") for a in client.list_artifacts(q["mlflow_run_id"]))
    # Each run saves its resolved config beside its outputs, and that file replays it.
    from dataworth.config import load_yaml

    assert IndexConfig.model_validate(load_yaml(assets / "index" / "index_config.yaml")) == cfg
    assert QueryConfig.model_validate(load_yaml(assets / "index" / "results" / "reports" / "query_config.yaml")) == qcfg
    assert "index_config.yaml" in {a.path for a in client.list_artifacts(out["mlflow_run_id"])}
    assert "query_config.yaml" in {a.path for a in client.list_artifacts(q["mlflow_run_id"])}


def test_rerun_hits_cache_and_config_change_needs_overwrite(harness, assets):
    from flows.index import index_flow

    cfg = index_config(assets)
    index_flow(cfg, progress=False)
    store = IndexStore(cfg.index_uri)
    versions = (store.examples_version(), store.gradients_version())
    before = {int(i): v for ids, vecs, _ in store.iter_gradients(100) for i, v in zip(ids, vecs)}
    rerun = index_flow(cfg, progress=False)  # same inputs: every stage is served from the cache
    assert (store.examples_version(), store.gradients_version()) == versions
    # The flow logs what the cached stages return: the new run still has its counts, marked cached.
    from mlflow import MlflowClient

    metrics = MlflowClient(cfg.tracking.tracking_uri).get_run(rerun["mlflow_run_id"]).data.metrics
    assert metrics["documents"] == len(TEXTS) and metrics["examples"] == rerun["examples"] > 0
    assert metrics["tokens"] > 0 and "log_tokens_per_s" in metrics and "curvature_seconds" in metrics
    assert metrics["tokenize_corpus.cached"] == 1 and metrics["fit_curvature.cached"] == 1
    assert metrics["log_gradients.cached"] == 1 and metrics["publish_index.cached"] == 0

    changed = index_config(assets, precondition="none")
    with pytest.raises(ValueError, match="overwrite"):
        index_flow(changed, progress=False)
    index_flow(changed.model_copy(update={"overwrite": True}), progress=False)
    manifest = store.read_manifest()
    assert manifest.config.logging.precondition == "none" and manifest.projections_artifact is None
    after = {int(i): v for ids, vecs, _ in store.iter_gradients(100) for i, v in zip(ids, vecs)}
    assert after.keys() == before.keys()
    assert not any(np.allclose(after[i], before[i]) for i in before)  # other projections: re-logged


def test_grown_corpus_relogs_only_changed_shards(harness, assets, tmp_path):
    from flows.index import index_flow

    docs = tmp_path / "growing.jsonl"
    docs.write_text((assets / "docs.jsonl").read_text())
    cfg = index_config(assets).model_copy(update={"index_uri": str(tmp_path / "grow-index")})
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dataset": str(docs)})})
    index_flow(cfg, progress=False)
    n_before = IndexStore(cfg.index_uri).num_examples()

    with open(docs, "a") as f:
        f.write(json.dumps({"id": "new", "text": "A new bakery opened by the mill."}) + "\n")
    states = task_states(index_flow(cfg, progress=False, return_state=True))
    store = IndexStore(cfg.index_uri)
    assert store.num_gradients() == store.num_examples() > n_before
    shards = sorted((k for k in states if k.startswith("log_gradients-shard-")), key=lambda k: int(k.rsplit("-", 1)[1]))
    last_full = (n_before // 4) - 1  # shards before the one the new example lands in are unchanged
    # (cached, so the KFAC-whitened projections were kept, not refitted on the grown corpus)
    assert all(states[k] == "Cached" for k in shards[: last_full + 1])
    assert states[shards[-1]] == "Completed"
    by_task = {name.rsplit("-", 1)[0]: state for name, state in states.items() if not name.startswith("log_gradients")}
    assert by_task["tokenize_corpus"] == "Completed" and by_task["fit_curvature"] == "Completed"


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_compact_store_index_then_query(harness, assets, tmp_path, dtype):
    """An index stored in bfloat16 or int8 holds the float32 index's gradients rounded (bfloat16 exactly as torch
    rounds, int8 within half a step of each row's scale), and its query scores are those of the decoded rows."""
    from flows.index import index_flow
    from flows.query import query_flow

    for name in ("float32", dtype):
        (tmp_path / name).mkdir()
    ref = tiny_index_config(assets, tmp_path / "float32", precondition="none")
    index_flow(ref, progress=False)
    exact = {int(i): v for ids, vecs, _ in IndexStore(ref.index_uri).iter_gradients(100) for i, v in zip(ids, vecs)}

    cfg = tiny_index_config(assets, tmp_path / dtype, precondition="none", storage_dtype=dtype)
    index_flow(cfg, progress=False)
    store = IndexStore(cfg.index_uri)
    assert store.gradient_dtype() == dtype and store.read_manifest().config.logging.storage_dtype == dtype
    ids, vecs = zip(*[(i, v) for i, v, _ in store.iter_gradients(100)])
    ids, got = np.concatenate(ids), np.concatenate(vecs)
    want = np.stack([exact[int(i)] for i in ids])
    if dtype == "bfloat16":
        np.testing.assert_array_equal(got, torch.from_numpy(want).to(torch.bfloat16).float().numpy())
    else:
        step = np.abs(want).max(axis=1, keepdims=True) / 127
        assert (np.abs(got - want) <= 0.5 * step * (1 + 1e-5)).all() and not np.array_equal(got, want)

    q = query_flow(
        QueryConfig(
            index_uri=cfg.index_uri,
            queries_path=str(assets / "queries.jsonl"),
            score=ScoreConfig(modes=["influence", "cosine"], top_k=3, query_batch_size=1),
            tracking=cfg.tracking,
        )
    )
    from dataworth.model import load_model
    from dataworth.queries import load_queries

    manifest = store.read_manifest()
    model, tok = load_model(ModelConfig(name_or_path=str(assets / "model")))
    specs = [s for s in load_queries(str(assets / "queries.jsonl")) if s.id == "cats"]
    enc = encode_queries(model, tok, specs, GenerationConfig(), 64)
    g_q = query_gradients(model, enc, manifest.config.logging, tok.pad_token_id, 2)
    curv = Curvature.from_bytes(store.read_artifact(manifest.curvature_artifact))
    scorer = Scorer(g_q, curv, ["influence", "cosine"], top_k=3)
    scorer.update(torch.from_numpy(ids), torch.from_numpy(got))
    rows = results_store(cfg.index_uri).read_scores(q["score_run_id"]).to_pylist()
    for mode in ("influence", "cosine"):
        mine = sorted((r for r in rows if r["mode"] == mode and r["query_id"] == "cats"), key=lambda r: r["rank"])
        assert [r["example_id"] for r in mine] == scorer.topk[mode].ids[0].tolist()
        np.testing.assert_allclose([r["score"] for r in mine], scorer.topk[mode].scores[0].numpy(), rtol=1e-4)
