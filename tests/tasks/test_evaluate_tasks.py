"""Evaluation and demo task bodies (`.fn`) against a temporary LanceDB directory and workspace."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dataworth.config import GenerationConfig, QuerySpec, ScoreConfig, TrackingConfig
from dataworth.evaluation.config import BrittlenessConfig, EvaluateConfig
from dataworth.evaluation.matrices import load_matrices, save_matrices
from dataworth.evaluation.subsets import keep_key, subset_key
from storage import IndexStore
from tasks.demo import FactTracing, evaluate_fact_tracing, summarize_demo
from tasks.evaluate import (
    MethodTable,
    fact_tracing_eval,
    lds_eval,
    plan_brittleness,
    plan_subsets,
    record_calibration,
    store_precision_eval,
    tail_patch_eval,
)
from tasks.index import publish_index
from tasks.query import score_queries
from tasks.report import EvaluationReport, assemble_evaluation_report

QUERIES = [
    QuerySpec(id="cats", prompt="Tova keeps three", completion=" grey cats"),
    QuerySpec(id="bread", prompt="Bread is baked", completion=" before dawn"),
]


@pytest.fixture
def published(stages, index_config):
    cfg = index_config(precondition="none")
    *_, manifest = stages.build(cfg)
    return cfg, publish_index.fn(cfg.index_uri, manifest).manifest


def _documents(index_uri: str) -> list[str]:
    rows = IndexStore(index_uri).read_examples(columns=["example_id", "document_id"]).to_pylist()
    return [r["document_id"] for r in sorted(rows, key=lambda r: r["example_id"])]


def test_bm25_ranks_the_document_sharing_the_words_first(published, tmp_path):
    """The evaluated BM25 is the query flow's bm25 mode (the index's full-text index), as a full matrix."""
    cfg, manifest = published
    path = tmp_path / "eval" / "scores.npz"
    score = ScoreConfig(modes=["bm25"], full_matrix=True)
    score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GenerationConfig(), str(path))
    matrices, query_ids = load_matrices(path)
    assert query_ids == ["cats", "bread"] and set(matrices) == {"bm25"}
    assert matrices["bm25"].shape == (2, manifest.num_examples)
    docs = _documents(cfg.index_uri)
    assert [docs[int(np.argmax(row))] for row in matrices["bm25"]] == ["d1", "d2"]


def test_tail_patch_eval_patches_each_retrieved_example_once_for_every_method(published, tmp_path):
    """Methods that retrieve the same examples share their steps: the table equals each method patched alone."""
    from dataworth.data import pad_token_id
    from dataworth.evaluation.tail_patch import tail_patch_scores
    from tasks.common import encode_index_queries, open_index_model

    cfg, manifest = published
    n = manifest.num_examples
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, n))
    b = a.copy()
    b[:, np.argsort(-a[0])[0]] -= 100.0  # b shares all but one of a's top-2 on the first query
    c = np.full((2, n), np.nan)
    c[:, :3] = a[:, :3]  # a rerank's row: NaN outside its candidates, which it ranks first
    path = save_matrices(tmp_path / "m.npz", {"a": a, "b": b, "c": c}, [q.id for q in QUERIES])
    table = tail_patch_eval.fn(cfg.index_uri, [path], QUERIES, 2, 0.01, "sgd").table
    assert set(table) == {"a", "b", "c", "random"}

    lm = open_index_model(cfg.index_uri, fresh=True)
    enc = encode_index_queries(lm, QUERIES, GenerationConfig(), 16)
    seqs = [
        r["input_ids"]
        for r in sorted(IndexStore(cfg.index_uri).read_examples().to_pylist(), key=lambda r: r["example_id"])
    ]
    for name, scores in (("a", a), ("b", b), ("c", c)):
        alone = [
            float(
                tail_patch_scores(
                    lm.model,
                    [seqs[i] for i in np.argsort(-scores[qi], kind="stable")[:2]],
                    [q],
                    pad_token_id(lm.tokenizer),
                    lr=0.01,
                ).mean()
            )
            for qi, q in enumerate(enc)
        ]
        assert table[name]["tail_patch"] == pytest.approx(float(np.mean(alone)), rel=1e-9, abs=1e-12), name


def test_fact_tracing_eval_reads_every_matrix(published, tmp_path):
    cfg, manifest = published
    docs = _documents(cfg.index_uri)
    perfect = np.array([[float(d == doc) for d in docs] for doc in ("d1", "d2")])
    paths = [
        save_matrices(tmp_path / "a.npz", {"perfect": perfect}, ["cats", "bread"]),
        save_matrices(tmp_path / "b.npz", {"reversed": -perfect}, ["cats", "bread"]),
    ]
    result = fact_tracing_eval.fn(cfg.index_uri, paths, {"cats": ["d1"], "bread": ["d2"]}, k=2)
    assert isinstance(result, MethodTable)
    assert result.table["perfect"] == {"mrr": 1.0, "recall@2": 1.0}
    assert result.table["reversed"]["mrr"] < 1.0
    assert result.metrics()["perfect.mrr"] == 1.0
    save_matrices(tmp_path / "c.npz", {"other": perfect}, ["bread", "cats"])
    with pytest.raises(ValueError, match="different queries"):
        fact_tracing_eval.fn(cfg.index_uri, [paths[0], str(tmp_path / "c.npz")], {"cats": ["d1"], "bread": ["d2"]})


def test_plans_keep_subsets_and_removals_keyed_by_content(tmp_path):
    plan = plan_subsets.fn(10, 4, 0.5, 0, str(tmp_path / "subsets.npy"))
    masks = np.load(plan["path"])
    assert masks.shape == (4, 10)
    assert plan["keeps"] == [np.flatnonzero(m).tolist() for m in masks]
    assert plan["keys"] == [subset_key(m) for m in masks] == [keep_key(k, 10) for k in plan["keeps"]]

    scores = np.arange(20, dtype=float).reshape(2, 10)
    path = save_matrices(tmp_path / "m.npz", {"influence": scores}, ["q0", "q1"])
    removals = plan_brittleness.fn([path], ["influence"], 1, [1, 3], 10, 0)
    assert [(r["method"], r["query"], r["k"]) for r in removals] == [
        ("influence", 0, 1),
        ("influence", 0, 3),
        ("random", 0, 1),
        ("random", 0, 3),
    ]
    assert removals[1]["keep"] == list(range(7))  # the top-3 of query 0 are its last three examples
    assert all(r["key"] == keep_key(r["keep"], 10) and len(r["keep"]) == 10 - r["k"] for r in removals)


def _lds_inputs(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 8))
    masks = np.load(plan_subsets.fn(8, 5, 0.5, 1, str(tmp_path / "subsets.npy"))["path"])
    actual = (masks.astype(float) @ scores.T).tolist()  # [subsets, queries]: exactly linear
    paths = [save_matrices(tmp_path / "scores.npz", {"influence": scores, "bm25": -scores}, ["q0", "q1"])]
    return paths, str(tmp_path / "subsets.npy"), actual


def test_lds_eval_scores_a_linear_model_perfectly(tmp_path):
    paths, masks_path, actual = _lds_inputs(tmp_path)
    result = lds_eval.fn(paths, masks_path, actual, str(tmp_path / "eval"))
    assert result.table["influence"]["lds"] == pytest.approx(1.0)
    assert result.table["bm25"]["lds"] == pytest.approx(-1.0)
    assert set(result.metrics()) == {"influence.lds", "bm25.lds"}
    assert json.loads((tmp_path / "eval" / "lds_scatter.json").read_text()) == result.scatter
    assert result.scatter["query"] == "q0" and len(result.scatter["predicted"]["influence"]) == 5


def test_lds_eval_counts_an_example_not_scored_as_zero(tmp_path):
    """A hybrid-rerank row holds NaN outside its candidates: no attribution, 0 in a subset's sum."""
    paths, masks_path, actual = _lds_inputs(tmp_path)
    scores, query_ids = load_matrices(paths[0])
    sparse = scores["influence"].copy()
    sparse[:, ::2] = np.nan
    zeros = np.nan_to_num(sparse)
    path = save_matrices(tmp_path / "sparse.npz", {"rerank": sparse, "zeros": zeros}, query_ids)
    table = lds_eval.fn([path], masks_path, actual, str(tmp_path / "eval")).table
    assert table["rerank"] == table["zeros"] and np.isfinite(table["rerank"]["lds"])


def test_assemble_evaluation_report_writes_the_table_and_its_plots(tmp_path):
    paths, masks_path, actual = _lds_inputs(tmp_path)
    lds = lds_eval.fn(paths, masks_path, actual, str(tmp_path / "eval"))
    removals = plan_brittleness.fn(paths, ["influence"], 1, [1], 8, 0)
    config = EvaluateConfig(
        workspace=str(tmp_path),
        baselines=["bm25"],
        brittleness=BrittlenessConfig(ks=[1], n_queries=1, methods=["influence"]),
        tracking=TrackingConfig(enabled=False),
    )
    loo = {"pearson_hessian": 0.99, "spearman_hessian": 0.98, "pearson_fisher": 0.9, "spearman_fisher": 0.8}
    report = assemble_evaluation_report.fn(
        config,
        str(tmp_path / "reports"),
        {"index": "somewhere"},
        paths,
        [{"influence": {"mrr": 0.5}, "bm25": {"mrr": 0.25}, "hybrid-rerank-influence": {"mrr": 0.75}}, lds.table],
        (4, 8, 2),
        config.logging,
        lds_scatter=lds.scatter,
        removals=removals,
        removed_log_probs=[[-1.0, -2.0], [-1.5, -2.0]],
        full_log_probs=[-0.5, -2.0],
        attribution_seconds=12.0,
        search_seconds=5.0,
        loo=loo,
    )
    assert isinstance(report, EvaluationReport)
    assert list(report.table) == ["influence", "bm25", "hybrid-rerank-influence", "random"]
    assert report.table["influence"] == {
        "mrr": 0.5,
        "lds": pytest.approx(1.0),
        "lds_valid_queries": 2,
        "brittle@1": 0.5,
        "seconds": 7.0,  # a gradient mode does not pay the full-text search
    }
    assert report.table["hybrid-rerank-influence"] == {"mrr": 0.75, "seconds": 12.0}
    assert "seconds" not in report.table["bm25"]
    assert report.table["random"] == {"brittle@1": 1.0}
    assert sorted(p.rsplit("/", 1)[-1] for p in report.plots) == [
        "brittleness.png",
        "lds_scatter.png",
        "score_histograms.png",
    ]
    html = open(report.report).read()
    assert "Linear datamodeling" in html and "Brittleness" in html and "somewhere" in html
    assert report.notes[0].startswith(f"{config.benchmark}: 4 documents, 8 examples, 2 queries; projection ")
    assert report.notes[1].startswith("Leave-one-out on softmax regression: Pearson 0.990")
    markdown = open(report.markdown).read()
    assert markdown.startswith("| method | mrr | lds | lds_valid_queries | brittle@1 | seconds |")  # first row's keys
    assert report.summary == "\n" + markdown.rstrip("\n")
    assert json.loads(report.record)["loo"] == loo


def test_record_calibration_republishes_the_manifest(published):
    cfg, manifest = published
    calibration = {"damping_factor": 0.5, "proxy": "fact_mrr", "test": 0.7, "logging": {"proj_dim_in": 8}}
    recorded = record_calibration.fn(cfg.index_uri, calibration)
    after = IndexStore(cfg.index_uri).read_manifest()
    assert after.calibration == calibration and after.published_at == manifest.published_at
    assert recorded.metrics() == {
        "calibrated_damping_factor": 0.5,
        "calibration.fact_mrr.test": 0.7,
        "calibrated_proj_dim_in": 8,
    }
    assert json.loads(recorded.as_json) == calibration


def test_demo_fact_tracing_counts_only_queries_stating_the_fact(published, tmp_path):
    cfg, manifest = published
    score = ScoreConfig(top_k=3, modes=["dot", "relatif"])
    scored = score_queries.fn(cfg.index_uri, manifest, QUERIES, score, GenerationConfig())
    relevant = {"cats": ["d1"], "bread": ["d2"]}
    tracing = evaluate_fact_tracing.fn(
        cfg.index_uri, scored.score_run_id, relevant, {"cats": "grey", "bread": "after dusk"}, k=3
    )
    assert isinstance(tracing, FactTracing) and (tracing.correct, tracing.total) == (1, 2)
    assert set(tracing.table) == {"dot", "relatif"} and set(tracing.table["dot"]) == {"mrr", "recall@3"}
    assert {"dot.mrr", "relatif.recall@3", "queries_correct", "queries_total"} <= set(tracing.metrics())
    text = summarize_demo.fn(cfg.index_uri, scored.score_run_id, relevant, 1, tracing, 0.5)
    lines = text.splitlines()
    assert lines[1].startswith("Top-5 training documents per query (mode relatif;")
    assert lines[3] == "cats: 'Tova keeps three' → ' grey cats'"
    assert sum(line.startswith("  ") for line in lines) == 3  # top_k=3 rows of the one query shown
    assert "… 1 more queries in the report" in lines
    assert "Fact tracing over 1 queries the model completes with the fact (of 2; model fact accuracy 0.50):" in lines


def test_choose_calibration_picks_the_best_tuning_score_and_names_the_size():
    from tasks.evaluate import choose_calibration

    sweep = lambda df, tune, test: {"damping_factor": df, "tune": tune, "test": test, "proxy": "lds"}  # noqa: E731
    sweeps = {"8x8": sweep(0.1, 0.2, 0.25), "32x32": sweep(1.0, 0.4, 0.35)}
    sizes = {"8x8": {"proj_dim_in": 8, "proj_dim_out": 8}, "32x32": {"proj_dim_in": 32, "proj_dim_out": 32}}
    chosen = choose_calibration.fn(sweeps, sizes, swept_sizes=True)
    assert chosen["size"] == chosen["proj_dim"] == "32x32" and chosen["damping_factor"] == 1.0
    assert chosen["logging"] == {"proj_dim_in": 32, "proj_dim_out": 32}
    assert chosen["proj_sweep"]["8x8"] == {"damping_factor": 0.1, "tune": 0.2, "test": 0.25}
    only = choose_calibration.fn({"8x8": sweeps["8x8"]}, sizes, swept_sizes=False)
    assert only == {**sweeps["8x8"], "size": "8x8"}
    with pytest.raises(ValueError, match="at least one damping sweep"):
        choose_calibration.fn({}, sizes, swept_sizes=False)


def test_prepared_benchmark_recipe_keeps_only_retrain_fields():
    from dataworth.training import RetrainConfig
    from tasks.benchmark import PreparedBenchmark

    bench = PreparedBenchmark(
        kind="facts",
        model_dir="m",
        documents="d.jsonl",
        queries="q.jsonl",
        train_kwargs={"epochs": 3, "lr": 1e-3, "seed": 7, "vocab_size": 512},
        train_seconds=1.0,
        train_steps=10,
        train_final_loss=0.5,
        num_documents=4,
    )
    assert bench.recipe() == RetrainConfig(epochs=3, lr=1e-3, seed=7)


def test_calibration_chooses_trackstars_task_mix_and_queries_read_it(published):
    """With trackstar among the modes, calibrate_damping also sweeps task_mix and records the choice; a query that
    gives no task_mix uses it, one that gives one keeps its own."""
    from tasks.common import index_task_mix
    from tasks.evaluate import calibrate_damping

    cfg, _manifest = published
    result = calibrate_damping.fn(
        cfg.index_uri,
        QUERIES,
        [0.1, 1.0],
        "fact_mrr",
        0.5,
        0,
        ["influence", "trackstar"],
        relevant={"cats": ["d1"], "bread": ["d2"]},
        task_mixes=[0.0, 0.5, 0.9],
    )
    assert result["task_mix"] in (0.0, 0.5, 0.9)
    assert set(result["task_mix_sweep"]) == {"0.0", "0.5", "0.9"}
    best = max(result["task_mix_sweep"], key=lambda w: result["task_mix_sweep"][w]["tune"])
    assert result["task_mix_sweep"][best]["tune"] == result["task_mix_sweep"][str(result["task_mix"])]["tune"]
    manifest = IndexStore(cfg.index_uri).read_manifest()
    assert manifest.calibration["task_mix"] == result["task_mix"]
    assert index_task_mix(ScoreConfig(), manifest) == result["task_mix"]
    assert index_task_mix(ScoreConfig(task_mix=0.3), manifest) == 0.3


def test_tail_patch_with_the_optimizers_step_needs_its_state(published, tmp_path):
    from dataworth.errors import ConfigError

    cfg, manifest = published
    a = np.random.default_rng(0).normal(size=(2, manifest.num_examples))
    path = save_matrices(tmp_path / "m.npz", {"a": a}, [q.id for q in QUERIES])
    with pytest.raises(ConfigError, match="optimizer.pt"):
        tail_patch_eval.fn(cfg.index_uri, [path], QUERIES, 2, 1e-4, "state")


def test_store_precision_eval_matches_an_explicit_rounding(published, tmp_path):
    """dot and influence agreement of a bfloat16 store equal those of the index's gradients rounded by torch
    (influence with the curvature refitted on the rounded rows), and the compact stores take fewer bytes."""
    import torch

    from dataworth.attribution.curvature import fit_fisher
    from dataworth.attribution.projection import Layout
    from dataworth.evaluation.matrices import rank_agreement
    from tasks.common import index_curvature, index_query_gradients, open_index_model

    cfg, manifest = published
    score = ScoreConfig(modes=["dot", "influence", "cosine"])
    got = store_precision_eval.fn(cfg.index_uri, QUERIES, score, ["bfloat16", "int8"], str(tmp_path / "w"), k=3)
    assert set(got.table) == {"bfloat16", "int8"} and got.examples == manifest.num_examples
    assert set(got.table["int8"]) == {"bytes_ratio"} | {
        f"{m}.{x}" for m in score.modes for x in ("spearman", "top3_overlap")
    }
    assert 0.3 < got.table["bfloat16"]["bytes_ratio"] < 0.8
    assert got.table["int8"]["bytes_ratio"] < got.table["bfloat16"]["bytes_ratio"]
    assert not list((tmp_path / "w").iterdir())  # the copies are removed

    store = IndexStore(cfg.index_uri)
    ids, vectors, _ = zip(*store.iter_gradients(4096))
    order = np.argsort(np.concatenate(ids))
    g = torch.from_numpy(np.concatenate(vectors)[order])
    low = g.to(torch.bfloat16).to(torch.float32)
    q = index_query_gradients(open_index_model(store, manifest), QUERIES, GenerationConfig(), 16)[1]
    damping = index_curvature(store, manifest, None).damping_factor
    layout, curvature = Layout.from_json(manifest.layout), manifest.config.curvature
    fitted = fit_fisher(layout, curvature, lambda: [low]).with_damping(damping)
    exact = fit_fisher(layout, curvature, lambda: [g]).with_damping(damping)
    want = {
        "dot": rank_agreement((q @ low.T).numpy(), (q @ g.T).numpy(), 3),
        "influence": rank_agreement((fitted.apply(q, -1.0) @ low.T).numpy(), (exact.apply(q, -1.0) @ g.T).numpy(), 3),
    }
    for mode, (rho, overlap) in want.items():
        assert got.table["bfloat16"][f"{mode}.spearman"] == pytest.approx(rho, abs=1e-6)
        assert got.table["bfloat16"][f"{mode}.top3_overlap"] == pytest.approx(overlap, abs=1e-9)
    assert rho < 1.0  # the rounding does move some ranks: the comparison is not trivially perfect


def test_a_prepared_benchmark_is_cached_per_python_version(monkeypatch):
    """docstrings-small's corpus is read from the running interpreter's standard library: prepare_benchmark's cache
    key holds the Python version, so another interpreter prepares its own (and `progress` changes nothing)."""
    import platform
    from types import SimpleNamespace

    from tasks.benchmark import prepare_benchmark

    ctx = SimpleNamespace(task=prepare_benchmark)
    inputs = {"workspace": "/w", "benchmark": "docstrings-small", "seed": 0, "train_epochs": None, "progress": True}

    def key(**update):
        return prepare_benchmark.cache_policy.compute_key(ctx, {**inputs, **update}, {})

    base = key()
    assert base and key(progress=False) == base and key(seed=1) != base
    monkeypatch.setattr(platform, "python_version", lambda: "3.99.0")
    assert key() != base
