"""Where a flow's tasks run, from its RunnerConfig: Prefect's thread pool here, or a Dask cluster through
prefect-dask's DaskTaskRunner (a local cluster of worker processes, or an existing one by address); with kind=pool
the index flow's own tasks run here and its shards as flow runs on a work pool's workers (flows/shards.py).

Dask workers are other processes, so they must reach the same Prefect API as the flow: a flow run against
a server (PREFECT_API_URL) hands them its URL; without one, `run_flow` starts this process's ephemeral
API server and points the run's settings, which prefect-dask sends with every task, at it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from dataworth.config import RunnerConfig

if TYPE_CHECKING:  # prefect is imported where used: the CLI starts EarlyAPI before any heavy import
    from prefect import Flow
    from prefect.futures import PrefectFuture
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.task_runners import TaskRunner


def task_runner(config: RunnerConfig) -> TaskRunner:
    """The task runner a RunnerConfig names."""
    from prefect.task_runners import ThreadPoolTaskRunner

    if config.kind in ("threads", "pool"):  # pool: the flow's own tasks here, its shards on the pool's workers
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
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if url:
        yield url
        return
    server = ephemeral_server()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield server.api_url


# A watchdog process runs this. Its stdin is a pipe whose only writer is the process that started the server: EOF
# means that process ended, however it ended (a SIGKILL runs no atexit, which is where Prefect stops the server), so
# the server is stopped too, unless it is gone already (the pid's start time tells a reused pid apart).
_WATCHDOG = """
import os, signal, sys, time
def alive(pid, birth=None):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" or birth not in (None, fields[19]) else fields[19]
pid = int(sys.argv[1])
birth = alive(pid)
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.stdin.buffer.read()
for sig, wait in ((signal.SIGTERM, 100), (signal.SIGKILL, 0)):
    if birth is None or not alive(pid, birth):
        break
    os.kill(pid, sig)
    for _ in range(wait):
        if not alive(pid, birth):
            break
        time.sleep(0.05)
"""
_watchdogs: list = []  # their stdin pipes stay open as long as this process lives


def _watch(pid: int) -> None:
    """Stop process `pid` when this process dies (Linux: reads /proc; elsewhere nothing is watched)."""
    import subprocess
    import sys

    if os.path.exists(f"/proc/{pid}/stat"):
        _watchdogs.append(
            subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, str(pid)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )


def ephemeral_server() -> SubprocessASGIServer:
    """This process's ephemeral Prefect API server (one per process), started if need be, and stopped with this
    process even when it is killed: a watchdog process outlives it by a moment and stops the server."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if not server.running and "_run_uvicorn_command" not in vars(server):
        launch = server._run_uvicorn_command

        def launch_watched():  # watched from the moment it exists: a kill during its boot leaves nothing either
            process = launch()
            _watch(process.pid)
            return process

        server._run_uvicorn_command = launch_watched
    server.start()
    return server


class EarlyAPI:
    """Prefect's ephemeral API server, started in a background thread so that its boot (a separate process:
    about 5–10 s of imports and database set-up) overlaps this process's own imports instead of following
    them. Started only when no server is configured (PREFECT_API_URL unset) and ephemeral mode is allowed;
    `wait()` before the first flow call, which then finds the same server (SubprocessASGIServer is one
    instance per process) already running."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="prefect-api-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

            if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
                return  # a configured server (or none allowed): nothing to start
            ephemeral_server()
        except BaseException as err:  # re-raised in the main thread by wait()
            self.error = err

    def booting(self) -> bool:
        """Whether the server is still being started (its start thread runs)."""
        return self._thread.is_alive()

    def wait(self) -> None:
        """Block until the server answers; raise what made its start fail."""
        self._thread.join()
        if self.error is not None:
            raise self.error


T = TypeVar("T")


def model_processes() -> int:
    """Processes that run this flow run's tasks: the Dask cluster's workers, else this process."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    client = getattr(ctx.task_runner, "client", None) if ctx else None  # DaskTaskRunner's
    return max(len(client.nthreads()), 1) if client is not None else 1


def in_window(
    submit: Callable[[T], PrefectFuture], items: Iterable[T], window: int
) -> Iterator[tuple[T, PrefectFuture]]:
    """Submit `submit(item)` for each item, keeping at most `window` in flight; yield (item, future) as each
    finishes, so memory is that of `window` tasks whatever the number of items."""
    from prefect.futures import as_completed

    pending: dict[PrefectFuture, T] = {}
    for item in items:
        if len(pending) >= window:
            done = next(as_completed(list(pending)))
            yield pending.pop(done), done
        pending[submit(item)] = item
    for done in as_completed(list(pending)):
        yield pending.pop(done), done


def with_runner(flow: Flow, config: RunnerConfig) -> Flow:
    """`flow` with the task runner `config` names (the flow itself when it names the default threads)."""
    return flow if config.kind in ("threads", "pool") else flow.with_options(task_runner=task_runner(config))


def run_flow(flow: Flow, config: Any, **kwargs: Any) -> Any:
    """Call `flow(config, **kwargs)` with the task runner of `config.runner` (configs without one: as is)."""
    runner: RunnerConfig | None = getattr(config, "runner", None)
    if runner is not None and runner.kind == "pool":
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise ValueError(
                "runner kind=pool needs the Prefect server whose work pool runs the shards, and PREFECT_API_URL is "
                "unset; start one (`prefect server start`), set PREFECT_API_URL to its API and start workers with "
                "deployments/setup_worker.sh"
            )
    if runner is None or runner.kind in ("threads", "pool"):
        return flow(config, **kwargs)
    with reachable_api():
        return with_runner(flow, runner)(config, **kwargs)
