"""`dataworth benchmark` end to end on tiny sizes under the real Prefect engine: the JSON summary, the
printed table and the MLflow metrics. No timing assertions: machines are noisy."""

import dataclasses
import importlib.util
import json
import math

import pytest
from mlflow import MlflowClient
from prefect import flow

from dataworth.config import BenchmarkConfig, BenchmarkModelConfig, TrackingConfig
from dataworth.evaluation.peers import INSTALL_COMMANDS, PEERS, missing_peer
from flows.benchmark import benchmark_flow, pairwise_job, render, summarize
from tasks.throughput import measure_pairwise

REQUIRED_KEYS = (
    "write_ratio_last_first",
    "scoring_vs_matmul",
    "scoring_vs_scan",
    "logging_vs_training",
    "peak_rss_ratio",
)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_benchmark_flow_end_to_end(harness, tmp_path, monkeypatch):
    monkeypatch.setattr("flows.benchmark.PAIRWISE_TRAIN", 12)  # the pairwise job's training sequences
    monkeypatch.setattr("flows.benchmark.PAIRWISE_ROUNDS", 2)
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
    # kronfluence and bergson run on the pairwise job where they are installed
    installed = [peer for peer in PEERS if missing_peer(peer) is None]
    ran = ["speedup_vs_lancedb", *(f"speedup_vs_{peer}" for peer in installed)]
    for key in (*REQUIRED_KEYS, *ran):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]) and summary[key] > 0, key
    assert set(summary["sizes"]) == {"512", "2048"}
    assert summary["sizes"]["2048"]["shards"] == 16
    assert summary["startup"]["index_seconds"] > 0 and summary["startup"]["query_seconds"] > 0
    # the same commands run by a `dataworth serve` service (the commands check that it ran them)
    assert summary["startup_service_index_seconds"] > 0 and summary["startup_service_query_seconds"] > 0
    assert summary["startup"]["service_ready_seconds"] > 0 and "with `dataworth serve` running" in out["table"]
    assert not (tmp_path / "ws" / "index-512").exists()  # indexes are removed after measuring

    printed = out["table"]  # what the flow prints
    assert "| 2,048 rows |" in printed and "speedup vs lancedb" in printed
    assert set(summary["sizes"]["512"]["peers"]) == {"lancedb"}
    pairwise = summary["pairwise"]
    assert pairwise["job"]["train"] == 12 and pairwise["job"]["queries"] == 2 and pairwise["job"]["seq_length"] == 16
    assert set(pairwise["systems"]) == {"dataworth", *PEERS}
    assert pairwise["rounds"] == 2 and len(pairwise["systems"]["dataworth"]["rounds_seconds"]) == 2
    assert "| dataworth |" in printed
    for peer in PEERS:
        timed = pairwise["systems"][peer]
        if peer in installed:
            assert timed["pairs_per_s"] > 0 and f"| {peer} |" in printed
        else:
            assert timed["pairs_per_s"] is None and f"speedup_vs_{peer}" not in summary
            assert f"- pairwise {peer}: not installed (pip install --no-deps" in printed

    metrics = MlflowClient(uri).get_run(out["mlflow_run_id"]).data.metrics
    for key in (
        *(REQUIRED_KEYS + tuple(ran)),
        *("n512.ingest_rows_per_s", "n2048.scores_per_s", "startup.index_seconds", "pairwise.dataworth.pairs_per_s"),
    ):
        assert key in metrics and metrics[key] > 0, key
    assert metrics["score_512.cached"] == 0.0
    # The ANN part, at the largest size only: the vector index's build, ANN + rerank against the exact pass.
    assert summary["ann"]["size"] == 2048 and summary["ann"]["partitions"] == 8  # √2048, at most rows / 256
    assert 0 < summary["ann_recall_at_10"] <= 1 and summary["ann_speedup_vs_exact"] > 0
    assert summary["ann_build_seconds"] > 0 and "ANN + exact rerank at 2,048 rows: IVF_RQ" in printed
    # two batches: the index as built (cold) and prewarmed, as a query runs it
    assert 0 < summary["ann_cold_recall_at_10"] <= 1 and summary["ann_cold_speedup_vs_exact"] > 0
    assert summary["ann_prewarm_seconds"] >= 0 and "| index as built (batch 1) |" in printed
    assert "| prewarmed, as a query runs (batch 2) |" in printed
    for key in (
        *("ann_recall_at_10", "ann_speedup_vs_exact", "n2048.ann_recall_at_10", "n2048.ann_build_seconds"),
        *("n2048.ann_cold_recall_at_10", "n2048.ann_cold_speedup_vs_exact"),
    ):
        assert key in metrics and metrics[key] > 0, key


def test_gpu_preset_without_cuda_is_refused(monkeypatch, tmp_path):
    import torch

    from flows.benchmark import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--preset cpu"):
        _device(BenchmarkConfig(preset="gpu", workspace=str(tmp_path)))


def test_gpu_preset_times_bigger_batches_unless_told():
    gpu = BenchmarkConfig(preset="gpu")
    assert (gpu.seq_length, gpu.batch_size, gpu.steps) == (512, 8, 10)
    assert (BenchmarkConfig().seq_length, BenchmarkConfig().batch_size, BenchmarkConfig().steps) == (128, 4, 2)
    given = BenchmarkConfig(preset="gpu", seq_length=64, batch_size=2, steps=3)
    assert (given.seq_length, given.batch_size, given.steps) == (64, 2, 3)


def test_pairwise_job_caps_the_logging_model():
    job = pairwise_job(BenchmarkConfig())  # GPT-2-small shape, 128 tokens
    assert job.shape == {"family": "gpt2", "layers": 4, "width": 256, "heads": 4, "vocab": 8192}
    assert (job.seq_length, job.train, job.queries) == (64, 64, 8)
    tiny = pairwise_job(BenchmarkConfig(model=BenchmarkModelConfig(layers=2, width=16, heads=2, vocab=61)))
    assert tiny.shape == {"family": "gpt2", "layers": 2, "width": 16, "heads": 2, "vocab": 61}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_peer_not_installed_is_skipped_with_its_install_command(harness, tmp_path, monkeypatch):
    """measure_pairwise with bergson hidden: dataworth runs, bergson is reported with the command that installs
    it, and neither the summary nor MLflow's metrics carry a speedup for it."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bergson" else real(name, *a))
    config = BenchmarkConfig(
        workspace=str(tmp_path),
        sizes=[10],
        peers=["bergson"],
        peer_queries=2,
        model=BenchmarkModelConfig(layers=1, width=8, heads=2, vocab=31),
        seq_length=8,
        batch_size=2,
        proj_dim=2,
    )
    job = dataclasses.replace(pairwise_job(config), train=4)

    @flow
    def pairwise_only():
        return measure_pairwise(str(tmp_path), job, ["bergson"], rounds=1)

    pairwise = pairwise_only()
    assert pairwise.systems["dataworth"].pairs_per_s > 0
    skipped = pairwise.systems["bergson"]
    assert skipped.pairs_per_s is None and skipped.note == f"not installed ({INSTALL_COMMANDS['bergson']})"
    assert not any("bergson" in key for key in pairwise.metrics())

    class Ran:  # the per-size figures summarize and render read
        write_ratio_last_first = rows_per_s = scoring_vs_matmul = scoring_vs_scan = pairs_per_s = 1.0
        matmul_scores_per_s = matmul_seconds = first_pass_seconds = 1.0
        peak_rss_mb, modes = None, 1

    per_size = {10: {"ingest": Ran(), "score": Ran(), "peers": {}}}
    summary = summarize(config, per_size, [], None, pairwise)
    assert "speedup_vs_bergson" not in summary and summary["pairwise_pairs_per_s"] > 0
    printed = render(config, per_size, [], None, summary, "cpu", pairwise)
    assert "- pairwise bergson: not installed (pip install --no-deps bergson jaxtyping" in printed
