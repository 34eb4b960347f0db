"""Where a flow's tasks run, from its RunnerConfig: Prefect's thread pool here, or a Dask cluster through
prefect-dask's DaskTaskRunner (a local cluster of worker processes, or an existing one by address).

Dask workers are other processes, so they must reach the same Prefect API as the flow: a flow run against
a server (PREFECT_API_URL) hands them its URL; without one, `run_flow` starts this process's ephemeral
API server and points the run's settings, which prefect-dask sends with every task, at it.
"""

from __future__ import annotations

import copyreg
import importlib
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import Flow
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from dataworth.config import RunnerConfig

# Process-wide locks that task functions use as globals. Prefect ships a task to a Dask worker by pickling its
# function by value (the module attribute is the Task, not the function), globals included; a lock cannot be
# pickled, and a copy would not lock anything. These pickle as a reference: the worker uses its own process's lock.
PROCESS_LOCKS: dict[str, tuple[str, ...]] = {"tasks.common": ("MODEL_LOCK",)}
_LOCK_TYPE = type(threading.Lock())


def process_lock(module: str, name: str) -> Any:
    """The lock `module.name` of this process."""
    return getattr(importlib.import_module(module), name)


def _reduce_lock(lock: Any) -> tuple:
    for module, names in PROCESS_LOCKS.items():
        loaded = sys.modules.get(module)
        for name in names:
            if loaded is not None and getattr(loaded, name, None) is lock:
                return process_lock, (module, name)
    raise TypeError(f"cannot pickle {type(lock).__name__!r} object")  # any other lock, as pickle says


def ship_locks_by_reference() -> None:
    """Let tasks that use PROCESS_LOCKS go to other processes (registered with copyreg, which cloudpickle reads)."""
    copyreg.pickle(_LOCK_TYPE, _reduce_lock)


def task_runner(config: RunnerConfig) -> TaskRunner:
    """The task runner a RunnerConfig names."""
    if config.kind == "threads":
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    ship_locks_by_reference()

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
