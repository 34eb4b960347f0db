"""MLflow through an explicit client and run id: a flow opens one run with `tracked_run` and logs
what its tasks return, so a stage served from the Prefect cache still reports (marked cached)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prefect.futures import PrefectFuture
from prefect.states import State

from dataworth.config import StageConfig, TrackingConfig, save_yaml

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_WORKSPACE = "dataworth-runs"
_store_lock = threading.Lock()


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    ws = Path(os.environ.get("DATAWORTH_WORKSPACE", DEFAULT_WORKSPACE)).absolute()
    ws.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{ws / 'mlflow.db'}"


def tracking_client(uri: str) -> MlflowClient:
    """An MLflow client of the store at `uri`. MLflow makes one store per URI per process (a new sqlite store
    creates its tables then, seconds of work) and every later client shares it. mlflow is imported here, not with
    this module: seconds of every command's start-up, which the CLI spends while Prefect's API boots (open_store)."""
    from mlflow import MlflowClient

    with _store_lock:  # the CLI may be making it in a warm-up thread (flows.warmup.warm_behind) meanwhile
        return MlflowClient(uri)


def open_store(cfg: TrackingConfig) -> None:
    """Make the MLflow store a run with `cfg` will log to (nothing when tracking is off): the run then finds it
    made. Creates the store as the run would (a sqlite file and its tables)."""
    if cfg.enabled:
        tracking_client(resolve_tracking_uri(cfg))


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
        self.client = tracking_client(self.uri) if cfg.enabled else None
        self.experiment = cfg.experiment
        self.parent_run_id = cfg.parent_run_id
        self.run_id = run_id

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str | None:
        if not self.enabled:
            return None
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment, _artifact_root(self.uri))
        tags = dict(tags or {})
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        from mlflow.entities import Param

        run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        flat = flatten(params)
        items = [Param(k, v[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        return self.run_id

    def child_config(self, cfg: TrackingConfig) -> TrackingConfig:
        """Tracking of a sub-flow: its run nests under this one, in the same store."""
        return cfg.model_copy(update={"parent_run_id": self.run_id, "tracking_uri": self.uri})

    def metrics(self, values: Mapping[str, float | None], step: int = 0) -> None:
        if not self.enabled or not self.run_id:
            return
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        ms = [Metric(k.replace("@", "_at_"), float(v), now, step) for k, v in values.items() if v is not None]
        if ms:
            self.client.log_batch(self.run_id, metrics=ms)

    def log(
        self,
        metrics: Mapping[str, float | None] | HasMetrics,
        *,
        stage: str | None = None,
        cached: bool | None = None,
        step: int = 0,
    ) -> None:
        """Log a task's metrics (a dict, or a result with `.metrics()`) into this run.

        With `stage` and `cached` given, also logs `<stage>.cached` (1 when the Prefect cache
        served the result: its metrics describe the run that computed it).
        """
        values = dict(metrics.metrics() if hasattr(metrics, "metrics") else metrics)
        if stage is not None and cached is not None:
            values[f"{stage}.cached"] = float(cached)
        self.metrics(values, step=step)

    def log_result(self, stage: str, outcome: State | PrefectFuture, step: int = 0) -> Any:
        """The result of a task called with return_state=True (or submitted), logged as `stage`.

        Raises the task's exception when it failed, as calling the task directly would.
        """
        if isinstance(outcome, PrefectFuture):
            outcome.wait()
            outcome = outcome.state
        result = outcome.result()
        if result is not None:
            self.log(result, stage=stage, cached=outcome.name == "Cached", step=step)
        return result

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
            from mlflow.entities import RunStatus

            status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
            self.client.set_terminated(self.run_id, status)


class HasMetrics(Protocol):
    def metrics(self) -> Mapping[str, float | None]: ...


@contextlib.contextmanager
def tracked_run(
    tracking: TrackingConfig,
    name: str,
    config: StageConfig,
    tags: Mapping[str, str] | None = None,
    config_path: str | os.PathLike[str] | None = None,
) -> Iterator[Tracker]:
    """One MLflow run around a flow body: parameters from `config`, tags `dataworth.flow=<name>`
    plus `tags`, FINISHED when the body returns and FAILED when it raises.

    On success the resolved config is saved as YAML at `config_path` (when given: beside the
    run's outputs, so `--config <that file>` replays the run) and as the run's artifact
    `<name>_config.yaml` (or the file name of `config_path`). Disabled tracking still saves the file.
    """
    tracker = Tracker(tracking)
    tracker.start(name, config.model_dump(mode="json"), {"dataworth.flow": name, **(tags or {})})
    ok = False
    try:
        yield tracker
        if config_path is not None:
            tracker.artifact(save_yaml(config, config_path))
        elif tracker.enabled:
            with tempfile.TemporaryDirectory() as d:
                tracker.artifact(save_yaml(config, Path(d, f"{name}_config.yaml")))
        ok = True
    finally:
        tracker.finish(ok)
