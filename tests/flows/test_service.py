"""`dataworth serve`: a real service process (a Prefect task worker with its own Prefect server), and `dataworth`
commands started as separate processes, as a user starts them: they run in the service, in the client's working
directory, store what a command run in its own process stores, and fail as one line with the same exit status.
Routing (which command goes to the service, and when it runs here instead) is tested without a service process."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny import TINY_CORPUS, write_tiny_assets

from flows import service
from storage import IndexStore

psutil = pytest.importorskip("psutil")

DATAWORTH = shutil.which("dataworth", path=os.path.dirname(sys.executable)) or "dataworth"


# ---------------------------------------------------------------------------------------------- routing, no service


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(service.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.delenv(service.SERVICE_ENV, raising=False)
    return tmp_path / "home"


@pytest.fixture(scope="module")
def api_url():
    """An HTTP server that answers `GET /api/health` as a Prefect API does (all the routing asks of it)."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()


@pytest.fixture
def record(home, api_url):
    def write(**fields) -> dict:
        return _record(home, **{"api_url": api_url, **fields})

    return write


def _record(home: Path, **fields) -> dict:
    info = {
        "pid": os.getpid(),
        "birth": service._birth(os.getpid()),
        "storage_path": str(home / "storage"),
        "fingerprint": service.code_fingerprint(),
        "started": "now",
        **fields,
    }
    home.mkdir(parents=True, exist_ok=True)
    (home / "service.json").write_text(json.dumps(info))
    return info


def test_commands_go_to_a_live_service_with_the_same_code(home, record, capsys):
    assert service.route("index", no_service=False) is None  # no service recorded
    info = record()
    for command in service.SERVED:
        assert service.route(command, no_service=False) == service.ServiceInfo(**info)
    assert service.route("benchmark", no_service=False) is None  # measures this process's own start-up
    assert service.route("index", no_service=True) is None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", ["0", "off", "false", "no", "OFF"])
def test_the_environment_turns_the_service_off(record, monkeypatch, value):
    record()
    monkeypatch.setenv(service.SERVICE_ENV, value)
    assert service.route("query", no_service=False) is None


def test_a_service_that_died_or_whose_pid_was_reused_is_ignored(home, record):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record(pid=dead.pid, birth="1")
    assert service.find_service() is None
    record(birth="1")  # this pid, another start time: a reused pid
    assert service.find_service() is None
    (home / "service.json").write_text("{not json")
    assert service.find_service() is None


def test_a_service_running_other_code_is_passed_over_with_a_reason(record, capsys):
    record(fingerprint="0123456789abcdef")
    assert service.route("index", no_service=False) is None
    err = capsys.readouterr().err
    assert "runs other code" in err and "dataworth serve --stop" in err and str(os.getpid()) in err


def test_a_service_whose_api_does_not_answer_is_passed_over_with_a_reason(home, capsys):
    _record(home, api_url="http://127.0.0.1:1/api")  # nothing listens on port 1
    assert service.route("query", no_service=False) is None
    err = capsys.readouterr().err
    assert "does not answer" in err and "running here" in err


def test_the_code_fingerprint_changes_with_a_module(tmp_path, monkeypatch):
    for package in ("dataworth", "flows", "tasks", "storage"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(service, "_ROOT", tmp_path)
    before = service.code_fingerprint()
    assert service.code_fingerprint() == before
    (tmp_path / "tasks" / "a.py").write_text("x = 22\n")
    assert service.code_fingerprint() != before


def test_commands_on_the_services_own_api_run_without_flow_heartbeats(monkeypatch):
    """A command's settings reach the service with its task run (Task.delay serializes the client's context, the task
    worker enters it): on the service's own server its flow runs send no heartbeats unless the client asked for
    them; on a server the user configured they keep Prefect's default."""
    from prefect.context import hydrated_context, serialize_context
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    own = "http://127.0.0.1:9/api"
    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    monkeypatch.setattr(service, "_own_api", [own])
    default = get_current_settings().flows.heartbeat_frequency
    assert default is not None  # Prefect's default: heartbeats on

    def served(updates: dict) -> int | None:
        with temporary_settings(updates):
            sent = serialize_context()  # what the client's Task.delay sends
        with hydrated_context(sent), service.command_settings():
            return get_current_settings().flows.heartbeat_frequency

    assert served({PREFECT_API_URL: own}) is None
    assert served({PREFECT_API_URL: own, "flows.heartbeat_frequency": 60}) == 60  # asked for: kept
    assert served({PREFECT_API_URL: "http://prefect.example:4200/api"}) == default  # the user's server
    monkeypatch.setattr(service, "_own_api", [])  # a service on a configured server
    assert served({PREFECT_API_URL: own}) == default


def test_a_failure_keeps_its_line_exit_status_and_log_through_json():
    from prefect.serializers import JSONSerializer

    line = "the index is damaged — rebuild it (log: /tmp/x y/index.log)"
    json_ = JSONSerializer()
    err = json_.loads(json_.dumps(service.CommandFailed(f"[exit 2] {line}")))
    assert isinstance(err, service.CommandFailed)
    assert (err.line, err.code, err.log) == (line, 2, "/tmp/x y/index.log")
    plain = service.CommandFailed("no exit status")
    assert (plain.line, plain.code, plain.log) == ("no exit status", 1, None)


# ------------------------------------------------------------------------------------------- a real service process


class Service:
    def __init__(self, tmp: Path):
        self.home, self.log = tmp / "home", tmp / "serve.log"
        self.env = {**os.environ, "DATAWORTH_HOME": str(self.home), "PREFECT_HOME": str(tmp / "prefect-home")}
        for name in ("PREFECT_API_URL", "DATAWORTH_SERVICE", "DATAWORTH_DEBUG"):
            self.env.pop(name, None)
        self.env["PREFECT_UI_ENABLED"] = "false"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [DATAWORTH, "serve"], env=self.env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, text=True
            )
        deadline = time.monotonic() + 300
        while not (self.home / "service.json").exists():
            assert self.proc.poll() is None, f"`dataworth serve` exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no service after 300 s: {self.log.read_text()[-3000:]}"
            time.sleep(0.5)
        self.info = json.loads((self.home / "service.json").read_text())

    def run(self, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [DATAWORTH, *args], env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=300
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("service")
    write_tiny_assets(tmp / "assets", TINY_CORPUS)
    svc = Service(tmp)
    try:
        yield svc
    finally:
        svc.stop()


def index_args(assets: Path, index: str, *extra: str) -> list[str]:
    return [
        "index",
        *("--model", str(assets / "model"), "--dataset", str(assets / "docs.jsonl"), "--id-column", "id"),
        *("--index", index, "--max-length", "16", "--proj-dim", "4", "--shard-size", "4", "--no-progress"),
        *("--projection", "gaussian", "--precondition", "none", "--mlflow-uri", "sqlite:///mlflow.db", *extra),
    ]


def gradients(uri: Path) -> dict[int, np.ndarray]:
    return {int(i): v for ids, vecs, _ in IndexStore(str(uri)).iter_gradients(100) for i, v in zip(ids, vecs)}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_commands_run_in_the_service_in_the_clients_directory(live, tmp_path):
    assets = live.home.parent / "assets"
    out = live.run(*index_args(assets, "idx"), cwd=tmp_path)  # a relative path: the client's directory
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"run by the dataworth service (pid {live.info['pid']})" in out.stdout
    assert "== index ==" in out.stdout and re.search(r"examples +\d+ \(\d+ logged, 0 kept\)", out.stdout)
    assert (tmp_path / "idx" / "gradients.lance").is_dir() and (tmp_path / "mlflow.db").exists()

    here = live.run(*index_args(assets, "idx-here"), "--no-service", cwd=tmp_path)
    assert here.returncode == 0, here.stdout + here.stderr
    assert "run by the dataworth service" not in here.stdout and "== index ==" in here.stdout
    served, local = gradients(tmp_path / "idx"), gradients(tmp_path / "idx-here")
    assert served.keys() == local.keys() and len(served) >= len(TINY_CORPUS)
    for i in served:
        np.testing.assert_array_equal(served[i], local[i])

    query = ["query", "--index", "idx", "--prompt", "the cat sat", "--max-new-tokens", "2", "--no-progress"]
    out = live.run(*query, "--mlflow-uri", "sqlite:///mlflow.db", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "run by the dataworth service" in out.stdout and "== query ==" in out.stdout
    topk = next(line.split()[-1] for line in out.stdout.splitlines() if line.strip().startswith("top-k table"))
    assert (tmp_path / topk).exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_command_that_fails_in_the_service_is_one_line_with_its_exit_status(live, tmp_path):
    assets = live.home.parent / "assets"
    args = index_args(assets, "idx", "--modules", "no_such_module")
    served = live.run(*args, cwd=tmp_path)
    local = live.run(*args, "--no-service", cwd=tmp_path)
    assert served.returncode == local.returncode == 2, served.stdout + served.stderr
    line = served.stderr.strip().splitlines()[-1]
    assert line.startswith("dataworth index: ") and "no_such_module" in line and "Traceback" not in served.stderr
    log = Path(line.rsplit("(log: ", 1)[1].rstrip(")"))
    assert log.exists() and "Traceback" in log.read_text()
    what = lambda text: next(x for x in text.splitlines() if x.startswith("dataworth index: ")).split(" (log: ")[0]  # noqa: E731
    assert what(served.stderr) == what(local.stderr)  # the same words as in its own process


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_second_service_is_refused_and_status_names_the_first(live, tmp_path):
    again = live.run("serve", cwd=tmp_path)
    assert again.returncode == 2 and "already running" in again.stderr and str(live.info["pid"]) in again.stderr
    status = live.run("serve", "--status", cwd=tmp_path)
    assert status.returncode == 0 and f"pid {live.info['pid']}" in status.stdout and "same code" in status.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stopping_the_service_stops_its_prefect_server_and_removes_its_record(tmp_path):
    svc = Service(tmp_path)
    try:
        children = psutil.Process(svc.proc.pid).children(recursive=True)
        assert any("uvicorn" in " ".join(c.cmdline()) for c in children)  # its own Prefect server
        stop = svc.run("serve", "--stop", cwd=tmp_path)
        assert stop.returncode == 0 and "stopped" in stop.stdout
        assert svc.proc.wait(30) == 0
        assert not (svc.home / "service.json").exists()
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [c.cmdline() for c in alive]
        none = svc.run("serve", "--status", cwd=tmp_path)
        assert none.returncode == 1 and "no service" in none.stdout
    finally:
        svc.stop()
