"""tracked_run: one MLflow run around a flow body, its config saved, task results logged (cached ones marked)."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from prefect.states import Completed, Failed
from pydantic import BaseModel

from dataworth.config import IndexConfig, TrackingConfig, load_yaml
from tasks.tracking import tracked_run


class _Result(BaseModel):
    examples: int

    def metrics(self) -> dict[str, float]:
        return {"examples": self.examples}


def test_tracked_run_logs_results_and_saves_config(index_config, tmp_path):
    cfg = index_config()
    path = tmp_path / "out" / "index_config.yaml"
    with tracked_run(cfg.tracking, "index", cfg, tags={"extra": "x"}, config_path=path) as run:
        assert run.uri == cfg.tracking.tracking_uri
        assert run.child_config(cfg.tracking).parent_run_id == run.run_id
        fresh = run.log_result("tokenize_corpus", Completed(data=_Result(examples=3)))
        cached = run.log_result("fit_curvature", Completed(name="Cached", data=_Result(examples=5)))
        run.log({"bytes_stored": 10.0})
    assert fresh.examples == 3 and cached.examples == 5
    client = MlflowClient(cfg.tracking.tracking_uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["dataworth.flow"] == "index" and got.data.tags["extra"] == "x"
    assert got.data.params["logging.projection"] == "gaussian"
    assert got.data.metrics["examples"] == 5 and got.data.metrics["bytes_stored"] == 10
    assert got.data.metrics["tokenize_corpus.cached"] == 0 and got.data.metrics["fit_curvature.cached"] == 1
    assert IndexConfig.model_validate(load_yaml(path)) == cfg  # replayable with --config
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["index_config.yaml"]


def test_tracked_run_fails_the_run_and_reraises(index_config, tmp_path):
    cfg = index_config()
    path = tmp_path / "index_config.yaml"
    with pytest.raises(ValueError, match="boom"):
        with tracked_run(cfg.tracking, "index", cfg, config_path=path) as run:
            run.log_result("tokenize_corpus", Failed(data=ValueError("boom")))
    assert MlflowClient(cfg.tracking.tracking_uri).get_run(run.run_id).info.status == "FAILED"
    assert not path.exists()  # only a run that finished saves its config


def test_tracked_run_without_tracking_still_saves_config(index_config, tmp_path):
    cfg = index_config().model_copy(update={"tracking": TrackingConfig(enabled=False)})
    with tracked_run(cfg.tracking, "index", cfg, config_path=tmp_path / "c.yaml") as run:
        run.log({"examples": 1}, stage="tokenize_corpus", cached=True)
    assert run.run_id is None and (tmp_path / "c.yaml").exists()
