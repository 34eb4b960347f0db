"""The pairwise job `dataworth benchmark` times dataworth, kronfluence and bergson on: each system runs it
on a tiny shape and scores the full Q × N matrix; a peer that is not installed is named with its install
command. No timing assertions: machines are noisy."""

import importlib.util

import numpy as np
import pytest

from dataworth.errors import ConfigError
from dataworth.evaluation import peers
from dataworth.evaluation.baselines import bergson
from dataworth.evaluation.peers import INSTALL_COMMANDS, PairwiseJob, missing_peer, time_pairwise

JOB = PairwiseJob(
    shape={"family": "gpt2", "layers": 2, "width": 16, "heads": 2, "vocab": 61},
    seq_length=12,
    train=10,
    queries=3,
    batch_size=4,
    proj_dim=4,
)


def _check(out: dict, parts: set[str]) -> None:
    assert set(out["parts"]) == parts
    assert out["seconds"] == pytest.approx(sum(out["parts"].values()))
    assert out["pairs_per_s"] == pytest.approx(JOB.queries * JOB.train / out["seconds"])
    assert out["threads"] == 1


def test_dataworth_runs_the_job():
    _check(time_pairwise("dataworth", JOB, threads=1), {"log_train_seconds", "queries_and_scores_seconds"})


def test_kronfluence_runs_the_job(tmp_path):
    pytest.importorskip("kronfluence")
    out = time_pairwise("kronfluence", JOB, threads=1, output_dir=str(tmp_path))
    _check(out, {"fit_factors_seconds", "pairwise_scores_seconds"})


def test_bergson_runs_the_job(tmp_path):
    pytest.importorskip("bergson")
    out = time_pairwise("bergson", JOB, threads=1, output_dir=str(tmp_path))
    _check(out, {"build_queries_seconds", "score_train_seconds"})


def test_bergson_exact_scores_equal_kronfluence_identity(tmp_path):
    """Without projection bergson's score is the exact gradient dot product, which kronfluence's identity
    strategy computes: the two adapters give both the same model, sequences, losses and layers."""
    pytest.importorskip("bergson")
    pytest.importorskip("kronfluence")
    from dataworth.evaluation.baselines.kronfluence import kronfluence_scores

    model, (train, queries) = JOB.model(), JOB.data()
    sequences = [e.input_ids for e in train]
    theirs = bergson.bergson_scores(model, sequences, queries, output_dir=str(tmp_path / "b"), projection_dim=0)
    exact = kronfluence_scores(
        model, sequences, queries, 0, strategy="identity", output_dir=str(tmp_path / "k"), batch_size=4
    )
    assert theirs["scores"].shape == exact["scores"].shape == (JOB.queries, JOB.train)
    scale = np.abs(exact["scores"]).max()
    np.testing.assert_allclose(theirs["scores"], exact["scores"], rtol=1e-4, atol=1e-4 * scale)


def test_rounds_keep_each_systems_best_and_report_a_broken_peer(monkeypatch):
    def broken(*args):
        raise RuntimeError("bergson broke")

    monkeypatch.setattr(peers, "_bergson", broken)
    runs = peers.time_pairwise_rounds(["dataworth", "bergson"], JOB, threads=1, rounds=5, budget_s=0)
    ours = runs["dataworth"]  # the budget is spent at once: the two rounds that always run
    assert len(ours["rounds_seconds"]) == 2 and ours["seconds"] == min(ours["rounds_seconds"])
    assert runs["bergson"] == {"error": "RuntimeError: bergson broke"}
    monkeypatch.setattr(peers, "_dataworth", broken)
    with pytest.raises(RuntimeError, match="bergson broke"):  # dataworth's own failure is never swallowed
        peers.time_pairwise_rounds(["dataworth"], JOB, threads=1, rounds=1)


def test_missing_peer_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bergson" else real(name, *a))
    assert missing_peer("bergson") == f"not installed ({INSTALL_COMMANDS['bergson']})"
    assert "pip install --no-deps bergson" in missing_peer("bergson")
    assert 'pip install --no-deps "kronfluence==1.0.1"' in INSTALL_COMMANDS["kronfluence"]
    with pytest.raises(ConfigError, match="unknown peer"):
        missing_peer("logix")


def test_unknown_system_is_refused():
    with pytest.raises(ConfigError, match="unknown system 'logix'"):
        time_pairwise("logix", JOB, threads=1)
