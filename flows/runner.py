"""Where a flow's tasks run, from its RunnerConfig: Prefect's thread pool here, or a Dask cluster through
prefect-dask's DaskTaskRunner (a local cluster of worker processes, or an existing one by address).

Dask workers are other processes, so they must reach the same Prefect API as the flow: a flow run against
a server (PREFECT_API_URL) hands them its URL; without one, `run_flow` starts this process's ephemeral
API server and points the run's settings, which prefect-dask sends with every task, at it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import Flow
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from dataworth.config import RunnerConfig


def task_runner(config: RunnerConfig) -> TaskRunner:
    """The task runner a RunnerConfig names."""
    if config.kind == "threads":
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": config.n_workers,
            "threads_per_worker": config.threads_per_worker,
            "processes": True,
            "dashboard_address": None,  # no web UI (and no port clash between runs)
        }
    )


@contextmanager
def reachable_api() -> Iterator[str]:
    """A Prefect API URL that other processes can reach, set for the duration: the configured server's, else
    this process's ephemeral server (started now if need be; the flow run itself would start the same one)."""
    url = PREFECT_API_URL.value()
    if url:
        yield url
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield server.api_url


def with_runner(flow: Flow, config: RunnerConfig) -> Flow:
    """`flow` with the task runner `config` names (the flow itself when it names the default threads)."""
    return flow if config.kind == "threads" else flow.with_options(task_runner=task_runner(config))


def run_flow(flow: Flow, config: Any, **kwargs: Any) -> Any:
    """Call `flow(config, **kwargs)` with the task runner of `config.runner` (configs without one: as is)."""
    runner: RunnerConfig | None = getattr(config, "runner", None)
    if runner is None or runner.kind == "threads":
        return flow(config, **kwargs)
    with reachable_api():
        return with_runner(flow, runner)(config, **kwargs)
