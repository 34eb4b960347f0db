"""The evaluate flow end to end on a tiny budget: every metric path runs and lands in MLflow."""

import math

import pytest
from flowstates import task_states

from dataworth.config import TrackingConfig
from dataworth.evaluation.config import (
    BrittlenessConfig,
    CalibrateConfig,
    EvaluateConfig,
    LDSConfig,
    TailPatchConfig,
)
from dataworth.training import RetrainConfig
from storage import IndexStore

pytestmark = pytest.mark.slow


def test_evaluate_flow_small_budget(harness, tmp_path):
    from mlflow import MlflowClient

    from flows.evaluate import evaluate_flow

    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="evaluate-test")
    config = EvaluateConfig(
        workspace=str(tmp_path / "ws"),
        train_epochs=4,
        lds=LDSConfig(n_subsets=3),
        brittleness=BrittlenessConfig(ks=[1, 2], n_queries=1, methods=["influence"]),
        tail_patch=TailPatchConfig(max_queries=3, top_k=2),
        retrain=RetrainConfig(epochs=1, seed=0),
        calibrate=CalibrateConfig(enabled=True, damping_factors=[0.01, 1.0], proj_dims=[8]),
        tracking=tracking,
    )
    out = evaluate_flow(config, progress=False)
    table = out["table"]
    assert {"dot", "influence", "relatif", "cosine", "bm25", "hybrid-rrf-influence", "hybrid-rerank-dot"} <= set(table)
    for method in ("influence", "bm25", "hybrid-rrf-relatif", "hybrid-rerank-influence"):
        row = table[method]
        assert {"mrr", "recall@10", "tail_patch", "lds"} <= set(row)
        assert 0 <= row["mrr"] <= 1 and -1 <= row["lds"] <= 1 or math.isnan(row["lds"])
    assert {"brittle@1", "brittle@2"} <= set(table["random"])
    assert out["loo"]["pearson_hessian"] > 0.9
    assert "tail_patch" in table["random"]  # the same step on random examples, the tail-patch baseline
    cal = out["calibration"]
    assert cal["damping_factor"] in (0.01, 1.0)
    assert set(cal["proj_sweep"]) == {"32x32", "8x8"} and cal["proj_dim"] in cal["proj_sweep"]
    best = max(cal["proj_sweep"].values(), key=lambda r: r["tune"])
    assert (cal["damping_factor"], cal["tune"]) == (best["damping_factor"], best["tune"])
    # the chosen size's index carries the calibration and is the one the table was measured on
    manifest = IndexStore(out["index_uri"]).read_manifest()
    assert manifest.calibration["damping_factor"] == cal["damping_factor"]
    assert f"{manifest.config.logging.proj_dim_in}x{manifest.config.logging.proj_dim_out}" == cal["proj_dim"]
    html = open(out["report"]).read()
    assert "Linear datamodeling" in html and "Brittleness" in html
    run = MlflowClient(tracking.tracking_uri).get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert "influence.lds" in run.data.metrics and "loo.pearson_hessian" in run.data.metrics
    plots = {a.path for a in MlflowClient(tracking.tracking_uri).list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/lds_scatter.png", "plots/brittleness.png", "plots/score_histograms.png"}


def test_retrained_models_are_shared_across_index_configs(harness, tmp_path):
    """LDS retraining depends on the corpus, the subsets and the recipe, not on how gradients are logged."""
    from flows.evaluate import evaluate_flow

    base = EvaluateConfig(
        workspace=str(tmp_path / "ws"),
        train_epochs=2,
        lds=LDSConfig(n_subsets=3),
        brittleness=BrittlenessConfig(enabled=False),
        tail_patch=TailPatchConfig(enabled=False),
        loo=False,
        fact_tracing=False,
        retrain=RetrainConfig(epochs=1, seed=0),
        tracking=TrackingConfig(enabled=False),
    )
    first_state = evaluate_flow(base, progress=False, return_state=True)
    # Another index over the same corpus, with its damping calibrated on LDS.
    other = base.model_copy(
        update={
            "logging": base.logging.model_copy(update={"precondition": "none"}),
            "calibrate": CalibrateConfig(enabled=True, proxy="lds", damping_factors=[0.01, 100.0]),
        }
    )
    second_state = evaluate_flow(other, progress=False, return_state=True)
    out = second_state.result()
    assert first_state.result()["index_uri"] != out["index_uri"]  # two indexes
    first, second = task_states(first_state), task_states(second_state)
    retrains = [k for k in second if k.startswith("retrain-")]
    assert len(retrains) == 4  # the full corpus and three subsets
    assert all(first[k] == "Completed" for k in retrains)
    assert all(second[k] == "Cached" for k in retrains)
    # The table is scored at the calibrated damping: over the tune and test halves together, the LDS of the
    # calibrated modes is what the sweep measured for the chosen factor.
    cal, table = out["calibration"], out["table"]
    assert IndexStore(out["index_uri"]).read_manifest().calibration["damping_factor"] == cal["damping_factor"]
    n_queries = cal["tune_queries"] + cal["test_queries"]
    assert all(table[m]["lds_valid_queries"] == n_queries for m in cal["modes"])
    swept = (cal["tune"] * cal["tune_queries"] + cal["test"] * cal["test_queries"]) / n_queries
    assert math.isclose(sum(table[m]["lds"] for m in cal["modes"]) / len(cal["modes"]), swept, abs_tol=1e-9)


def test_tracin_over_checkpoints(harness, tmp_path):
    """--checkpoints 1: the benchmark model saves one intermediate checkpoint, it is indexed, and every gradient
    mode is measured again as tracin-<mode> = η_final · score(final) + η_1 · score(checkpoint), checked against the
    two indexes scored one at a time; the table's LDS, MRR and tail-patch cover the tracin methods."""
    import numpy as np

    from dataworth.config import QueryConfig, ScoreConfig
    from dataworth.evaluation.matrices import load_matrices
    from dataworth.queries import load_queries
    from flows.evaluate import evaluate_flow
    from flows.query import query_flow

    config = EvaluateConfig(
        workspace=str(tmp_path / "ws"),
        train_epochs=2,
        checkpoints=1,
        score=ScoreConfig(modes=["dot", "influence", "relatif"], top_k=5),
        lds=LDSConfig(n_subsets=3),
        brittleness=BrittlenessConfig(enabled=False),
        tail_patch=TailPatchConfig(max_queries=2, top_k=2),
        retrain=RetrainConfig(epochs=1, seed=0),
        loo=False,
        store_dtypes=[],
        tracking=TrackingConfig(enabled=False),
    )
    out = evaluate_flow(config, progress=False)
    table, tracin = out["table"], out["tracin"]
    final, checkpoint = tracin["indexes"]
    assert final == out["index_uri"] and checkpoint == f"{final}-step-{checkpoint.rsplit('-', 1)[1]}"
    assert len(tracin["weights"]) == 2 and tracin["weights"][1] > tracin["weights"][0] > 0  # cosine decay
    for mode in ("dot", "influence", "relatif"):
        row = table[f"tracin-{mode}"]
        assert {"mrr", "recall@10", "tail_patch", "lds", "seconds"} <= set(row)
        assert row["seconds"] > table[mode]["seconds"]  # it pays for the checkpoint's index too
    assert "summed over the final model and 1 earlier checkpoint (after steps" in open(out["report"]).read()
    # The summed matrices against each index scored alone (full matrices, same queries).
    queries = load_queries(str(tmp_path / "ws" / "facts-small" / "corpus" / "queries.jsonl"))
    alone = []
    for uri in (final, checkpoint):
        got = query_flow(
            QueryConfig(
                index_uri=uri,
                queries=queries,
                score=ScoreConfig(modes=["dot", "influence", "relatif"], full_matrix=True),
                report_dir=str(tmp_path / "alone"),
                tracking=TrackingConfig(enabled=False),
            )
        )
        alone.append(load_matrices(got["full_matrix"])[0])
    summed, _ = load_matrices(str(next((tmp_path / "ws" / "facts-small" / "eval").glob("tracin-*.npz"))))
    w0, w1 = tracin["weights"]
    for mode in ("dot", "influence", "relatif"):
        expected = w0 * alone[0][mode] + w1 * alone[1][mode]
        # float32 scores: a score near 0 is compared at the matrix's own scale, not at its own
        scale = np.abs(expected).max()
        np.testing.assert_allclose(summed[f"tracin-{mode}"], expected, rtol=1e-4, atol=1e-6 * scale)
