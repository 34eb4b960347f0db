"""`dataworth benchmark` end to end on tiny sizes under the real Prefect engine: the JSON summary, the
printed table and the MLflow metrics. No timing assertions: machines are noisy."""

import json
import math

import pytest
from mlflow import MlflowClient

from dataworth.config import BenchmarkConfig, BenchmarkModelConfig, TrackingConfig
from flows.benchmark import benchmark_flow

REQUIRED_KEYS = ("write_ratio_last_first", "scoring_vs_matmul", "logging_vs_training", "peak_rss_ratio")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_benchmark_flow_end_to_end(harness, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = BenchmarkConfig(
        workspace=str(tmp_path / "ws"),
        sizes=[2048, 512],
        dim=32,
        shard_size=128,
        num_queries=8,
        train_batch_size=300,
        block_dim=16,
        peer_queries=2,
        model=BenchmarkModelConfig(layers=2, width=16, heads=2, vocab=61),
        seq_length=16,
        batch_size=2,
        steps=1,
        proj_dim=4,
        json_path=str(tmp_path / "out" / "benchmark.json"),
        tracking=TrackingConfig(tracking_uri=uri, experiment="bench-test"),
    )
    out = benchmark_flow(config)

    summary = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    ran = ["speedup_vs_lancedb"]  # kronfluence and bergson are not installed in the test environment
    for key in (*REQUIRED_KEYS, *ran):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]) and summary[key] > 0, key
    assert set(summary["sizes"]) == {"512", "2048"}
    assert summary["sizes"]["2048"]["shards"] == 16
    assert summary["startup"]["index_seconds"] > 0 and summary["startup"]["query_seconds"] > 0
    assert not (tmp_path / "ws" / "index-512").exists()  # indexes are removed after measuring

    printed = out["table"]  # what the flow prints
    assert "| 2,048 rows |" in printed and "speedup vs lancedb" in printed
    for peer in ("kronfluence", "bergson"):
        skipped = summary["sizes"]["512"]["peers"][peer]
        if skipped["pairs_per_s"] is None:
            assert f"- {peer}: not installed" in printed or f"- {peer}: installed" in printed
        else:
            assert f"speedup_vs_{peer}" in summary

    metrics = MlflowClient(uri).get_run(out["mlflow_run_id"]).data.metrics
    for key in (*REQUIRED_KEYS, *ran, "n512.ingest_rows_per_s", "n2048.scores_per_s", "startup.index_seconds"):
        assert key in metrics and metrics[key] > 0, key
    assert metrics["score_512.cached"] == 0.0


def test_gpu_preset_without_cuda_is_refused(monkeypatch, tmp_path):
    import torch

    from flows.benchmark import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--preset cpu"):
        _device(BenchmarkConfig(preset="gpu", workspace=str(tmp_path)))
