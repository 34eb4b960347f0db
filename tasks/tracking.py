"""MLflow through an explicit client and run id, so tasks on any worker log to the flow's run."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.utils.time import get_current_time_millis

from dataworth.config import TrackingConfig

DEFAULT_WORKSPACE = "dataworth-runs"


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    ws = Path(os.environ.get("DATAWORTH_WORKSPACE", DEFAULT_WORKSPACE)).absolute()
    ws.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{ws / 'mlflow.db'}"


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").absolute().as_uri()
    return None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class Tracker:
    """One MLflow run. Disabled tracking turns every call into a no-op (run_id None)."""

    def __init__(self, cfg: TrackingConfig, run_id: str | None = None):
        self.enabled = cfg.enabled
        self.uri = resolve_tracking_uri(cfg) if cfg.enabled else None
        self.client = MlflowClient(self.uri) if cfg.enabled else None
        self.experiment = cfg.experiment
        self.parent_run_id = cfg.parent_run_id
        self.run_id = run_id

    @classmethod
    def attach(cls, tracking_uri: str | None, run_id: str | None) -> "Tracker":
        if not run_id or not tracking_uri:
            return cls(TrackingConfig(enabled=False))
        return cls(TrackingConfig(tracking_uri=tracking_uri), run_id)

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str | None:
        if not self.enabled:
            return None
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment, _artifact_root(self.uri))
        tags = dict(tags or {})
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        flat = flatten(params)
        items = [Param(k, v[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        return self.run_id

    @property
    def task_kwargs(self) -> dict[str, str | None]:
        """What a task needs to log into this run from any worker."""
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def child_config(self, cfg: TrackingConfig) -> TrackingConfig:
        """Tracking of a sub-flow: its run nests under this one, in the same store."""
        return cfg.model_copy(update={"parent_run_id": self.run_id, "tracking_uri": self.uri})

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        if not self.enabled or not self.run_id:
            return
        now = get_current_time_millis()
        ms = [Metric(k.replace("@", "_at_"), float(v), now, step) for k, v in values.items() if v is not None]
        if ms:
            self.client.log_batch(self.run_id, metrics=ms)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and self.run_id:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def artifact_text(self, name: str, text: str) -> None:
        if not (self.enabled and self.run_id):
            return
        with tempfile.TemporaryDirectory() as d:
            p = Path(d, name)
            p.write_text(text)
            self.client.log_artifact(self.run_id, str(p))

    def finish(self, ok: bool) -> None:
        if self.enabled and self.run_id:
            status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
            self.client.set_terminated(self.run_id, status)
