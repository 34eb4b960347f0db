"""An index and a query flow run every model pass and every scoring batch on the process's one compute thread
(tasks.common.COMPUTE; why in tests/tasks/test_compute_thread.py), whichever of Prefect's threads ran the task."""

import json
import threading

import pytest
from tiny import TINY_CORPUS, tiny_index_config, write_tiny_assets

from dataworth.attribution.hooks import BackwardHooks
from dataworth.attribution.scoring import Scorer
from dataworth.config import QueryConfig, ScoreConfig

pytestmark = pytest.mark.slow


def test_model_passes_and_scoring_run_on_the_compute_thread(harness, tmp_path, monkeypatch):
    from flows.index import index_flow
    from flows.query import query_flow

    seen: list[tuple[str, str]] = []

    def recording(what, real):
        def run(*args, **kwargs):
            seen.append((what, threading.current_thread().name))
            return real(*args, **kwargs)

        return run

    monkeypatch.setattr(BackwardHooks, "_backward", recording("model pass", BackwardHooks._backward))
    monkeypatch.setattr(Scorer, "update", recording("scoring batch", Scorer.update))
    root = write_tiny_assets(tmp_path, TINY_CORPUS)
    (root / "queries.jsonl").write_text(json.dumps({"id": "q", "prompt": "Tova keeps three", "completion": " cats"}))
    cfg = tiny_index_config(root, root / "out", precondition="kfac", precondition_examples=4)
    index_flow(cfg, progress=False)
    query_flow(
        QueryConfig(
            index_uri=cfg.index_uri,
            queries_path=str(root / "queries.jsonl"),
            score=ScoreConfig(top_k=3, modes=["dot", "relatif"]),
            tracking=cfg.tracking,
        )
    )
    kinds = {what for what, _ in seen}
    assert kinds == {"model pass", "scoring batch"}, kinds
    elsewhere = sorted({(what, name) for what, name in seen if not name.startswith("dataworth-compute")})
    assert not elsewhere, f"torch work ran off the compute thread: {elsewhere}"
