"""`dataworth serve`: a long-lived process that runs the commands of this machine's `dataworth` CLI, so a command
pays for none of its own start-up (imports of torch, transformers, lancedb, mlflow, prefect's server: 10–20 s of
CPU on a small machine) but the submission of its run.

It is a Prefect task worker (`prefect.task_worker.serve`) of one task, `run_command`: a command's client builds
and validates its config as always, then submits `run_command` as a background task run (`Task.delay`) to the
service's Prefect API and waits for its final state; the service runs the command's flow in its own process, the
modules it needs imported once. Prefect is the queue, the record of every command (a task run, with its flow run
nested); nothing here schedules anything. The service runs one command at a
time (a command that arrives meanwhile waits its turn, and is told so), in the client's working directory, so
relative paths mean what they mean to the client.

The client finds the service through a small file, `$DATAWORTH_HOME/service.json` (default `~/.dataworth`): its
pid (with the process's start time, so a reused pid is not taken for it), its Prefect API and result storage,
and a fingerprint of dataworth's code. A client whose code differs from the service's (the code was edited or
upgraded since the service started) runs the command itself and says why; so does one given `--no-service` or
`DATAWORTH_SERVICE=0`. A command whose service's Prefect API does not answer runs here too.

This module is imported by every command's client: it imports nothing heavy at module level.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import signal
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flows.failures import RunLog, describe_failure, one_line

HOME_ENV = "DATAWORTH_HOME"
SERVICE_ENV = "DATAWORTH_SERVICE"  # "0", "off", "false", "no": every command runs in its own process
# Commands the service runs. `benchmark` measures this machine's start-up (and runs commands itself): never.
SERVED = ("index", "query", "evaluate", "demo")
_PACKAGES = ("dataworth", "flows", "tasks", "storage")
_ROOT = Path(__file__).resolve().parents[1]
_own_api: list[str] = []  # the URL of the Prefect API server this service started for itself, if it did


def home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".dataworth")


def service_file() -> Path:
    return home() / "service.json"


def disabled() -> bool:
    return os.environ.get(SERVICE_ENV, "").strip().lower() in ("0", "off", "false", "no")


def code_fingerprint() -> str:
    """dataworth's code as this process would import it: every module's path, size and modification time, and
    the interpreter. Equal fingerprints: the service runs the code the client would (about 1 ms to compute)."""
    h = hashlib.sha256(sys.executable.encode())
    for package in _PACKAGES:
        for path in sorted((_ROOT / package).rglob("*.py")):
            st = path.stat()
            h.update(f"{path.relative_to(_ROOT)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _birth(pid: int) -> str | None:
    """The start time of process `pid` (Linux /proc; elsewhere "?" for any live pid), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in "ZX" else fields[19]
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return "?"


@dataclass(frozen=True)
class ServiceInfo:
    pid: int
    birth: str
    api_url: str
    storage_path: str
    fingerprint: str
    started: str

    def alive(self) -> bool:
        return _birth(self.pid) == self.birth


def find_service() -> ServiceInfo | None:
    """The running service of $DATAWORTH_HOME, if any (a file left by a service that died is ignored)."""
    path = service_file()
    try:
        info = ServiceInfo(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return info if info.alive() else None


class CommandFailed(RuntimeError):
    """A command that failed in the service. Its message, `[exit N] <the one-line error>`, is all that a task run's
    JSON-stored failure keeps (Prefect stores an exception as its type and message): N is the exit status the
    command has when it runs in its own process; the line names the log file the service wrote."""

    @property
    def code(self) -> int:
        head, _, _ = str(self).partition("] ")
        return int(head.removeprefix("[exit ")) if head.startswith("[exit ") else 1

    @property
    def line(self) -> str:
        head, sep, rest = str(self).partition("] ")
        return rest if sep and head.startswith("[exit ") else str(self)

    @property
    def log(self) -> str | None:
        _, sep, path = self.line.rpartition(" (log: ")
        return path.removesuffix(")") if sep else None


@functools.cache
def run_command_task():
    """The one task the service serves (defined on first use, so the client imports prefect only to submit)."""
    from prefect import task
    from prefect.cache_policies import INPUTS

    # Every submission carries a new request id, so the cache key (INPUTS; a task worker refuses no policy) never
    # matches an earlier run: a command always runs.
    # JSON, never pickle (as every task of dataworth): reading the service's result store runs no code.
    @task(name="dataworth-command", cache_policy=INPUTS, persist_result=True, result_serializer="json", retries=0)
    def run_command(command: str, config: dict, cwd: str, request_id: str, debug: bool = False) -> dict:
        """Run a `dataworth <command>` for a client, in the client's working directory; returns what the command
        prints (its flow's output and its closing summary)."""
        return _execute(command, config, cwd, debug)

    return run_command


def _execute(command: str, config: dict, cwd: str, debug: bool) -> dict:
    from flows.cli import config_class, flow_summary, run_command_flow

    cfg = config_class(command).model_validate(config)
    log = RunLog(command, debug)
    out = io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)  # one command at a time (the worker's limit): relative paths are the client's
    try:
        log.install()
        with contextlib.redirect_stdout(out), command_settings():
            summary = flow_summary(command, run_command_flow(command, cfg, progress=False))
    except Exception as err:
        log.log_failure(err)
        log.close(keep=True)
        what, fix = describe_failure(err)
        where = f" (log: {log.path})" if log.path else ""
        code = 2 if isinstance(err, ValueError) else 1  # bad input (never retried) or a failed run, as in main()
        raise CommandFailed(f"[exit {code}] {what} — {fix}{where}") from None
    finally:
        os.chdir(here)
    log.close(keep=False)
    return {"stdout": out.getvalue(), "summary": summary}


@contextlib.contextmanager
def command_settings():
    """Prefect's settings for a command's flow runs: on the API server this service started for itself, those of
    a server a command starts for itself (flows.runner.OWN_SERVER_DEFAULTS: no flow-run heartbeats unless asked
    for). A command's settings are its client's (Task.delay sends them), which left Prefect's default heartbeats
    on: 0-1 s of every served command. A server the user configured keeps its heartbeats."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.runner import OWN_SERVER_DEFAULTS

    if not _own_api or PREFECT_API_URL.value() != _own_api[0]:
        yield
        return
    with temporary_settings(set_defaults=OWN_SERVER_DEFAULTS):
        yield


# ------------------------------------------------------------------------------------------------------- client


def submit(info: ServiceInfo, command: str, config: Any, debug: bool, prefix: str) -> int:
    """Run `command` with `config` in the service; print what it printed; return the command's exit status."""
    os.environ["PREFECT_API_URL"] = info.api_url
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = info.storage_path  # where .delay() leaves the parameters
    os.environ.pop("PREFECT_LOCAL_STORAGE_PATH", None)
    import logging

    from prefect.client.orchestration import get_client
    from prefect.futures import PrefectDistributedFuture

    logging.getLogger("prefect.tasks").setLevel(logging.WARNING)  # the line below says where the run is

    task = run_command_task()
    try:
        future = task.delay(command, config.model_dump(mode="json"), os.getcwd(), uuid.uuid4().hex, debug)
    except Exception as err:  # its API stopped answering since `route` asked
        print(
            prefix,
            f"the dataworth service (pid {info.pid}) did not take the command: {one_line(err)[:300]} — run it again, "
            "or with --no-service",
            file=sys.stderr,
        )
        return 1
    ui = info.api_url.removesuffix("/api")
    print(f"{prefix} run by the dataworth service (pid {info.pid}): {ui}/runs/task-run/{future.task_run_id}")
    told, start, pause = False, time.monotonic(), 0.02
    try:
        with get_client(sync_client=True) as client:
            while True:
                state = client.read_task_run(future.task_run_id).state
                if state is not None and state.is_final():
                    break
                if not told and state is not None and state.is_scheduled() and time.monotonic() - start > 5:
                    print(f"{prefix} waiting for the service to take it (it runs one command at a time)")
                    told = True
                time.sleep(pause)
                pause = min(pause * 1.5, 0.25)
    except KeyboardInterrupt:
        print(f"{prefix} stopped waiting; the command goes on in the service (task run {future.task_run_id})")
        return 130
    try:
        result = PrefectDistributedFuture(future.task_run_id).result()
    except CommandFailed as err:
        if debug and err.log:  # the traceback, from the log file the service wrote
            with contextlib.suppress(OSError):
                sys.stderr.write(Path(err.log).read_text())
        print(prefix, err.line, file=sys.stderr)
        return err.code
    except Exception as err:  # the run failed outside the command (the service stopped, …)
        print(prefix, f"the dataworth service did not finish the command: {err} — run it again", file=sys.stderr)
        return 1
    if result["stdout"]:
        sys.stdout.write(result["stdout"])
    from flows.cli import print_summary

    print_summary(command, result["summary"])
    return 0


def route(command: str, no_service: bool) -> ServiceInfo | None:
    """The service to run `command` in, or None to run it here (saying why when a service was passed over)."""
    if command not in SERVED or no_service or disabled():
        return None
    info = find_service()
    if info is None:
        return None
    if info.fingerprint != code_fingerprint():
        print(
            f"dataworth {command}: the dataworth service (pid {info.pid}) runs other code than this command "
            "(edited or upgraded since it started); running here — restart it (`dataworth serve --stop`, then "
            "`dataworth serve`)",
            file=sys.stderr,
        )
        return None
    try:  # before prefect is imported here: its settings are read once, and a command run here needs its own
        import httpx

        answered = httpx.get(f"{info.api_url}/health", timeout=5).status_code == 200
    except Exception:  # noqa: BLE001 - any failure to answer means the same
        answered = False
    if not answered:
        print(
            f"dataworth {command}: the dataworth service (pid {info.pid}) runs, but its Prefect API "
            f"({info.api_url}) does not answer; running here",
            file=sys.stderr,
        )
        return None
    return info


# ------------------------------------------------------------------------------------------------------ service


def stop(timeout: float = 30) -> int:
    info = find_service()
    if info is None:
        print(f"dataworth serve: no service is running (none recorded in {service_file()})")
        return 0
    os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while info.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if info.alive():
        msg = f"dataworth serve: the service (pid {info.pid}) did not stop in {timeout:.0f} s — kill it"
        print(msg, file=sys.stderr)
        return 1
    print(f"dataworth serve: stopped the service (pid {info.pid})")
    return 0


def status() -> int:
    info = find_service()
    if info is None:
        print(f"dataworth serve: no service is running (none recorded in {service_file()})")
        return 1
    same = "same code as this command" if info.fingerprint == code_fingerprint() else "OTHER code than this command"
    print(f"dataworth serve: pid {info.pid}, since {info.started}, API {info.api_url}, {same}")
    return 0


def serve() -> int:
    """Run the service in this process until SIGINT/SIGTERM."""
    running = find_service()
    if running is not None:
        print(
            f"dataworth serve: a service is already running (pid {running.pid}, {service_file()}) — stop it with "
            "`dataworth serve --stop`, or give this one another DATAWORTH_HOME",
            file=sys.stderr,
        )
        return 2
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from flows.runner import ephemeral_server

    url = PREFECT_API_URL.value()
    if not url:  # no server configured: this process's own, stopped with it
        url = ephemeral_server().api_url
        _own_api.append(url)
    with temporary_settings({PREFECT_API_URL: url}):
        import importlib

        from flows.cli import _RUNS
        from flows.warmup import imports_frozen

        with imports_frozen():  # every command's modules, once
            for module, *_ in _RUNS.values():
                importlib.import_module(module)
            importlib.import_module("transformers.modeling_utils")
        storage = str(Path(get_current_settings().results.local_storage_path).expanduser().absolute())
        info = ServiceInfo(
            pid=os.getpid(),
            birth=_birth(os.getpid()) or "?",
            api_url=url,
            storage_path=storage,
            fingerprint=code_fingerprint(),
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
        path = service_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(info)))

        def _terminate(signum, frame):  # SIGTERM ends the service as Ctrl-C does
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, _terminate)
        # The command task runs outside any flow run, so Prefect's API log handler warns on each of its log lines;
        # its flow runs' logs do reach the API.
        warnings.filterwarnings("ignore", message="Logger 'prefect.task_runs' attempted to send logs")
        from prefect.task_worker import serve as serve_tasks

        print(f"dataworth serve: pid {info.pid}, Prefect API {url}; serving {', '.join(SERVED)} (Ctrl-C stops)")
        try:
            tmp.replace(path)  # published only now: a client that finds the file finds every module imported
            serve_tasks(run_command_task(), limit=1)  # one at a time: each runs in its client's directory
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            _own_api.clear()
            with contextlib.suppress(OSError, ValueError, TypeError):
                if json.loads(path.read_text())["pid"] == info.pid:
                    path.unlink()
            tmp.unlink(missing_ok=True)
    print("dataworth serve: stopped")
    return 0
