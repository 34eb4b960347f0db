"""Where a flow's tasks run, from its RunnerConfig: Prefect's thread pool here, or a Dask cluster through
prefect-dask's DaskTaskRunner (a local cluster of worker processes, or an existing one by address); with kind=pool
the index flow's own tasks run here and its shards as flow runs on a work pool's workers (flows/shards.py).

Dask workers are other processes, so they must reach the same Prefect API as the flow: a flow run against
a server (PREFECT_API_URL) hands them its URL; without one, `run_flow` starts this process's ephemeral
API server and points the run's settings, which prefect-dask sends with every task, at it.
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from dataworth.config import RunnerConfig
from flows.prefect_api import PARENT_PIPE_ENV

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


class OwnAPI:
    """A Prefect API server in a process of its own, started the way Prefect starts its ephemeral one (uvicorn on
    Prefect's app factory, here through flows.prefect_api, which prepares its routes ahead; the UI off, ephemeral
    mode: no background services) but without importing Prefect here: Prefect's `SubprocessASGIServer` costs the
    process that starts it the import of Prefect's server package (2-4 s of CPU on a small machine) before the
    server process even begins its own boot. The process reads Prefect's settings from the same environment,
    working directory and profile as this one. Used through a URL (`temporary_settings` of PREFECT_API_URL), so
    Prefect itself never starts another one; stopped when this process exits, and when this one is killed by
    itself (its stdin, a pipe only this process holds, ends: flows.prefect_api.watch_parent) and by a watchdog
    process."""

    def __init__(self) -> None:
        import atexit
        import tempfile

        # The folder holding this `flows` package: the server imports its app factory (flows.prefect_api) from there.
        self._app_dir = str(Path(__file__).resolve().parent.parent)
        self._env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1"}
        self._env["PREFECT__SERVER_FINAL"] = "1"
        self._env[PARENT_PIPE_ENV] = "1"  # flows.prefect_api.watch_parent: stdin is our pipe
        self._log = tempfile.TemporaryFile()
        self.port = _free_port()
        self.process = self._launch()
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _launch(self):
        import subprocess

        args = [sys.executable, "-m", "uvicorn", "--app-dir", self._app_dir, "--factory"]
        args += ["flows.prefect_api:create_app", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--log-level", "error", "--lifespan", "on"]
        # stdin: a pipe held by this process alone, whose end tells the server this process is gone.
        process = subprocess.Popen(
            args, env=self._env, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT
        )
        _watch(process.pid)
        return process

    def wait_ready(self, timeout: float) -> None:
        """Block until the server answers its health check; raise with what it printed if it does not in time."""
        for _ in range(5):  # exit code 3: uvicorn found the port taken meanwhile; another port
            code = self._wait(timeout)
            if code is None:
                return
            if code != 3:
                break
            self.port = _free_port()
            self.process = self._launch()
        self._log.seek(0)
        said = self._log.read().decode(errors="replace").strip().splitlines()[-20:]
        raise RuntimeError(
            f"the Prefect API server this command starts did not answer on {self.api_url} within {timeout:.0f} s "
            f"(exit code {code}): {' / '.join(said) or 'it printed nothing'}; set "
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher on a busy machine, or start a server "
            "(`prefect server start`) and set PREFECT_API_URL"
        )

    def _wait(self, timeout: float) -> int | None:
        """None once the server answers its health check; else the exit code it ended with (-1: still silent)."""
        import time
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                return code
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return None
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.process.kill()
        return -1

    def stop(self) -> None:
        """Ask the server to stop and go on: it shuts down by itself (the watchdog kills it if it lingers)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
        self.process = None


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_own_api: list[OwnAPI] = []  # the one this process started, if any
# Setting defaults (temporary_settings' set_defaults) of flow runs on an API server a dataworth process started for
# itself: no flow-run heartbeats unless asked for (PREFECT_FLOWS_HEARTBEAT_FREQUENCY set anywhere wins). They serve
# a server's zombie-flow automations, which such a server (ephemeral mode: no services) never runs, and every flow
# run's exit joins the heartbeat thread, which sleeps in whole seconds (0-1 s per flow and sub-flow run).
OWN_SERVER_DEFAULTS = {"flows.heartbeat_frequency": None}


def own_api_url() -> str | None:
    """The URL of the API server this process started for its own runs (EarlyAPI), if any."""
    return _own_api[0].api_url if _own_api else None


def _server_configured() -> bool:
    """Whether Prefect is told to use a server (PREFECT_API_URL) or to start none: from its settings when Prefect is
    imported already (then free to read), else from the environment alone (a profile, prefect.toml or .env that
    sets one is found by EarlyAPI's thread, which then stops the server started meanwhile)."""
    if "prefect.settings" in sys.modules:
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

        return bool(PREFECT_API_URL.value()) or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value()
    off = os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "").strip().lower() in ("0", "false", "no", "off")
    return bool(os.environ.get("PREFECT_API_URL")) or off


class EarlyAPI:
    """The command's Prefect API server, started at once so that its boot (a separate process: about 4 s of imports
    and database set-up here) overlaps this process's own imports instead of following them. Started (as an
    OwnAPI) unless PREFECT_API_URL or PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=false is in the environment; a thread
    then reads Prefect's settings (every source: profile, prefect.toml, .env) and stops it when they configure a
    server after all, else waits for it to answer. `wait()` before the first flow call, and run the flow inside
    `settings()`, which points Prefect at it."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.url: str | None = None
        self._server: OwnAPI | None = None
        if not _own_api and not _server_configured():
            try:
                self._server = OwnAPI()
            except OSError as err:  # no process could be started: said by wait()
                self.error = err
        # In this context: Prefect's settings of a `temporary_settings` block (a test harness) are context variables.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._start,), name="prefect-api-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        if self.error is not None:
            return
        try:
            from prefect.settings import (
                PREFECT_API_URL,
                PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
                PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
            )

            if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
                if self._server is not None:  # a configured server (or none allowed): the one started goes
                    self._server.stop()
                return
            if self._server is None and not _own_api:  # (settings that allow it, set in this process)
                self._server = OwnAPI()
            if self._server is not None:
                self._server.wait_ready(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
                _own_api.append(self._server)
            self.url = _own_api[0].api_url
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

    @contextmanager
    def settings(self) -> Iterator[None]:
        """Prefect's settings pointed at the started server for the duration (nothing changed when none was)."""
        if self.url is None:
            yield
            return
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

        # No UI is served (as Prefect's own ephemeral server): no "View at <url>" line with a link that would not load.
        with temporary_settings({PREFECT_API_URL: self.url, PREFECT_UI_URL: ""}, set_defaults=OWN_SERVER_DEFAULTS):
            yield


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

        if not PREFECT_API_URL.value() or PREFECT_API_URL.value() == own_api_url():
            raise ValueError(
                "runner kind=pool needs the Prefect server whose work pool runs the shards, and PREFECT_API_URL is "
                "unset; start one (`prefect server start`), set PREFECT_API_URL to its API and start workers with "
                "deployments/setup_worker.sh"
            )
    if runner is None or runner.kind in ("threads", "pool"):
        return flow(config, **kwargs)
    with reachable_api():
        return with_runner(flow, runner)(config, **kwargs)
