"""A real Prefect server on 127.0.0.1 and two process workers on one pool (deployments/setup_worker.sh), the
log-shards deployment deployed from deployments/prefect.yaml, and the index flow run by the `dataworth` command
with --runner.kind pool: its shard ranges run as flow runs on both workers and store what a single-process run
stores. A worker SIGKILLed mid-run (with the flow run it was running) loses nothing: the zombie-flow automation marks
its run Crashed when the heartbeats stop, and the index flow submits that range again to the other worker. A
SIGKILLed `dataworth index` leaves no temporary Prefect server behind. Every process started here is stopped by
pid, and checked gone."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from tiny import TINY_CORPUS, write_tiny_assets

from storage import IndexStore

psutil = pytest.importorskip("psutil")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
DATAWORTH = shutil.which("dataworth", path=os.path.dirname(sys.executable)) or "dataworth"
PREFECT = shutil.which("prefect", path=os.path.dirname(sys.executable)) or "prefect"
POOL = "dataworth-gpu"
# The test's zombie window: the log-shards deployment beats every 30 s (Prefect's minimum), 90 s shipped.
CRASH_AFTER_S = 45
STALL_S = 300  # only a failure detector: a stalled run fails here instead of hanging


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(what: str, check, timeout: float = 120, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Processes:
    """Processes this test starts, each in its own session (process group = its pid), stopped by pid."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.started: dict[str, subprocess.Popen] = {}
        self.others: set[int] = set()  # descendants seen (a worker's flow runs run in sessions of their own)

    def start(self, name: str, args: list[str], env: dict, cwd: Path = ROOT) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def descendants(self, pid: int) -> list[int]:
        try:
            kids = [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.others.update(kids)
        return kids

    def kill(self, name: str, sig=signal.SIGKILL) -> list[int]:
        """Signal `name`'s process group and every process it started (its own sessions included)."""
        proc = self.started[name]
        kids = self.descendants(proc.pid)
        for pid in [proc.pid, *kids]:
            try:
                os.killpg(pid, sig) if pid == proc.pid else os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return kids

    def stop(self, name: str, grace: float = 15) -> None:
        proc = self.started[name]
        if proc.poll() is None:
            self.kill(name, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:  # a worker whose server is gone ignores SIGTERM
                pass
        self.kill(name, signal.SIGKILL)
        proc.wait(30)

    def stop_all(self) -> None:
        for name in reversed(list(self.started)):  # workers before the server they talk to
            self.stop(name)
        for pid in self.others:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        leftover = wait_for_gone([p.pid for p in self.started.values()] + sorted(self.others))
        assert not leftover, f"processes still running: {leftover}"


def wait_for_gone(pids: list[int], timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(not gone(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if not gone(p)]


class Live:
    """The server's URL, the environment every process gets, and API helpers."""

    def __init__(self, procs: Processes, url: str, env: dict):
        self.procs, self.url, self.env = procs, url, env
        self.single_index: Path | None = None
        self.http = httpx.Client(base_url=url, timeout=30)

    def post(self, path: str, body: dict) -> list | dict:
        r = self.http.post(path, json=body)
        r.raise_for_status()
        return r.json()

    def workers(self) -> set[str]:
        try:
            return {w["name"] for w in self.post(f"/work_pools/{POOL}/workers/filter", {}) if w["status"] == "ONLINE"}
        except httpx.HTTPStatusError:  # the pool is not created yet
            return set()

    def shard_runs(self, since: str) -> list[dict]:
        """log-shards flow runs created since `since` (an ISO time)."""
        runs = {"expected_start_time": {"after_": since}}
        body = {"flows": {"name": {"any_": ["log-shards"]}}, "flow_runs": runs, "sort": "EXPECTED_START_TIME_ASC"}
        return self.post("/flow_runs/filter", body)

    def worker_of(self, run_id: str) -> str | None:
        """The worker that ran `run_id`, as the server knows it: the one whose Pending proposal won labels the run.
        Not the workers' logs: two idle workers that poll at once both log "submitting flow run" for the same run,
        and the loser's submission is then aborted ("This run is in a PENDING state")."""
        r = self.http.get(f"/flow_runs/{run_id}")
        r.raise_for_status()
        return (r.json().get("labels") or {}).get("prefect.worker.name")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("live-assets"), TINY_CORPUS)


@pytest.fixture(scope="module")
def live(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    procs = Processes(tmp)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        # setup_worker.sh and the workers run `prefect` and `python` from PATH: this interpreter's, as under an
        # activated virtual environment (make test runs .venv/bin/python without activating it).
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "DATAWORTH_ROOT": str(ROOT),
        "DATAWORTH_GPU_SLOTS": "4",
        "DATAWORTH_WORKER_STOP_S": "5",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("DATAWORTH_DEBUG", None)
    try:
        procs.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env)
        server = Live(procs, url, env)

        def healthy():
            try:
                return server.http.get("/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the Prefect server", healthy, timeout=180)
        # The shipped automation, with a shorter window; setup_worker.sh finds it by name and keeps it.
        zombies = yaml.safe_load((ROOT / "deployments" / "zombie-flows.yaml").read_text())
        server.post("/automations/", {**zombies, "trigger": {**zombies["trigger"], "within": CRASH_AFTER_S}})
        # The single-process baseline (threads) runs while the workers start: on 2 cores, every step here waits.
        server.single_index = tmp / "single" / "index"
        run_index(server, "single", index_args(assets, server.single_index))
        setup = ["bash", str(ROOT / "deployments" / "setup_worker.sh"), "--limit", "1", "--name"]
        procs.start("w1", [*setup, "w1"], env)
        procs.start("w2", [*setup, "w2"], env)
        wait_for("the work pool", lambda: server.http.get(f"/work_pools/{POOL}").status_code == 200, timeout=180)
        deploy = [PREFECT, "--no-prompt", "deploy", "--name", "log-shards"]
        deploy += ["--prefect-file", "deployments/prefect.yaml"]
        out = subprocess.run(deploy, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        wait_for("both workers", lambda: server.workers() == {"w1", "w2"}, timeout=180)
        yield server
    finally:
        procs.stop_all()


def index_args(assets: Path, index: Path, *extra: str) -> list[str]:
    return [
        DATAWORTH,
        "index",
        *("--model", str(assets / "model"), "--dataset", str(assets / "docs.jsonl"), "--id-column", "id"),
        *("--index", str(index), "--max-length", "16", "--proj-dim", "4", "--shard-size", "4"),
        *("--no-mlflow", "--no-progress", *extra),
    ]


POOL_ARGS = ("--runner.kind", "pool", "--runner.shards-per-run", "2", "--runner.runs-in-flight", "2")


def run_index(live: Live, name: str, args: list[str]) -> subprocess.Popen:
    cwd = Path(args[args.index("--index") + 1]).parent
    cwd.mkdir(parents=True, exist_ok=True)
    return live.procs.start(name, args, live.env, cwd=cwd)


def finish(live: Live, name: str, proc: subprocess.Popen) -> str:
    rc = proc.wait(STALL_S)
    out = live.procs.log(name)
    assert rc == 0, out[-5000:]
    return out


def gradients(uri: Path) -> dict[int, np.ndarray]:
    return {int(i): v for ids, vecs, _ in IndexStore(str(uri)).iter_gradients(100) for i, v in zip(ids, vecs)}


@pytest.fixture(scope="module")
def single(live):
    """The single-process index (threads, the same server; started by `live`): what every pool run must store."""
    finish(live, "single", live.procs.started["single"])
    return gradients(live.single_index)


def check_same_index(index: Path, expected: dict[int, np.ndarray]) -> None:
    store = IndexStore(str(index))
    store.check_gradient_ids(len(expected))  # every example stored exactly once
    got = gradients(index)
    assert sorted(got) == sorted(expected) == list(range(len(expected)))
    for i in expected:
        assert np.array_equal(got[i], expected[i]), i


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))


def test_index_shards_run_on_both_workers_of_the_pool(live, assets, single, tmp_path):
    since = utc_now()
    index = tmp_path / "index"
    finish(live, "pool", run_index(live, "pool", index_args(assets, index, *POOL_ARGS)))
    check_same_index(index, single)
    runs = live.shard_runs(since)
    # Shard 0 alone (it creates the table), then two ranges of two shards at once: one on each worker (--limit 1: the
    # worker that takes one range is busy for the whole run, a fresh process of many seconds, while the other polls
    # every second).
    assert sorted(r["name"] for r in runs) == ["log-shards-0-0", "log-shards-1-2", "log-shards-3-4"]
    assert {r["state_type"] for r in runs} == {"COMPLETED"}
    assert all(r["parent_task_run_id"] for r in runs)  # subflows of the index flow run
    ranges = [r for r in runs if r["name"] != "log-shards-0-0"]
    assert {live.worker_of(r["id"]) for r in ranges} == {"w1", "w2"}


def test_a_worker_killed_mid_run_loses_nothing(live, assets, single, tmp_path):
    since = utc_now()
    seen = {w: len(live.procs.log(w)) for w in ("w1", "w2")}  # their logs so far: the previous test's runs
    index = tmp_path / "index"
    proc = run_index(live, "killed", index_args(assets, index, *POOL_ARGS))

    def a_range_begins():  # a worker's flow run has just begun logging a range of shards (not shard 0 alone)
        for worker, offset in seen.items():
            begun = re.search(r"Beginning subflow run '(log-shards-(?!0-0)[0-9-]+)'", live.procs.log(worker)[offset:])
            if begun:
                return worker, begun.group(1)
        return None

    victim_worker, victim_name = wait_for("a range of shards to begin", a_range_begins, timeout=STALL_S, every=0.05)
    flow_runs = live.procs.kill(victim_worker)  # the worker, and the flow run it started (its own session)
    assert flow_runs, "the killed worker ran no flow-run process"
    assert not wait_for_gone([live.procs.started[victim_worker].pid, *flow_runs])
    survivor = ({"w1", "w2"} - {victim_worker}).pop()
    out = finish(live, "killed", proc)
    runs = live.shard_runs(since)
    victim = [r for r in runs if r["name"] == victim_name]
    assert [r["state_type"] for r in victim] == ["CRASHED", "COMPLETED"], victim  # by creation time
    assert f"flow run {victim[0]['id']} crashed" in out, out[-5000:]
    assert live.worker_of(victim[0]["id"]) == victim_worker and live.worker_of(victim[1]["id"]) == survivor
    check_same_index(index, single)


def test_a_killed_index_command_leaves_no_prefect_server(assets, tmp_path):
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("PREFECT_API_URL", None)  # the command starts its own temporary server
    procs = Processes(tmp_path)
    try:
        cli = procs.start("cli", index_args(assets, tmp_path / "index"), env, cwd=tmp_path)

        def server_pid():
            for child in psutil.Process(cli.pid).children():
                if "uvicorn" in child.cmdline():
                    return child.pid
            return None

        server = wait_for("the temporary server", server_pid, timeout=120, every=0.1)
        helpers = procs.descendants(cli.pid)
        cli.send_signal(signal.SIGKILL)
        cli.wait(30)
        leftover = wait_for_gone([server, *helpers])
        assert not leftover, f"still running after the command was killed: {leftover}"
    finally:
        procs.stop_all()


def test_the_nightly_deployment_on_a_growing_corpus(live, assets, tmp_path):
    """deployments/prefect.yaml's nightly-index, deployed and run by a worker of the pool on a corpus directory that
    grows from one night to the next: the second run logs only the new documents and copies the rest."""
    import mlflow
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deploy = [PREFECT, "--no-prompt", "deploy", "--name", "nightly-index", "--prefect-file", "deployments/prefect.yaml"]
    out = subprocess.run(deploy, env=live.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    shipped = next(d for d in spec["deployments"] if d["name"] == "nightly-index")["parameters"]["config"]
    corpus, tracking = tmp_path / "corpus", f"sqlite:///{tmp_path / 'mlflow.db'}"
    corpus.mkdir()
    # The shipped parameters with this test's places: the worker runs in the repository (DATAWORTH_ROOT).
    config = {
        **shipped,
        "model": {**shipped["model"], "name_or_path": str(assets / "model")},
        "data": {**shipped["data"], "dataset": f"{corpus}/*.jsonl", "max_length": 16},
        "index_uri": str(tmp_path / "index"),
        "tracking": {"tracking_uri": tracking, "experiment": "nightly"},
    }
    nights = [TINY_CORPUS[:5], TINY_CORPUS[5:]]
    for night, texts in enumerate(nights):
        (corpus / f"night-{night}.jsonl").write_text(
            "".join(json.dumps({"id": f"n{night}-{i}", "text": t}) + "\n" for i, t in enumerate(texts))
        )
        with temporary_settings({PREFECT_API_URL: live.url}):
            run = run_deployment("index/nightly-index", parameters={"config": config}, timeout=STALL_S)
        assert run.state.is_completed(), run.state
    store = IndexStore(config["index_uri"])
    assert len(store.published_versions()) == 2
    manifest = store.read_manifest()
    assert manifest.num_documents == len(TINY_CORPUS)
    mlflow.set_tracking_uri(tracking)
    runs = mlflow.search_runs(experiment_names=["nightly"], order_by=["start_time ASC"])
    first, second = runs.to_dict("records")
    assert second["metrics.examples_reused"] == first["metrics.examples_computed"] > 0
    assert second["metrics.examples_computed"] == manifest.num_examples - first["metrics.examples_computed"] > 0


def test_a_worker_stops_on_sigterm_after_its_server_is_gone(live):
    """Last of the module's live tests: with the server stopped, a SIGTERM to a worker started by setup_worker.sh
    ends it within its stop window (a bare `prefect worker` keeps retrying the dead server instead)."""
    alive = [w for w in ("w1", "w2") if live.procs.started[w].poll() is None]
    assert alive, "no worker left running"
    script = live.procs.started[alive[0]]
    # An idle worker: the previous test's last flow-run process (the worker's child, in a session of its own) exits
    # seconds after its run is Completed. One still exiting when the server goes is no part of the worker (the script
    # stops the worker; a stopping worker lets its runs finish) and can outlive the script by a minute: Prefect's
    # client retries a refused connection with a backoff of 2+4+8+16+32 s.
    worker = wait_for("an idle worker", lambda: idle_worker(script.pid), timeout=STALL_S)
    assert "worker" in psutil.Process(worker).cmdline(), "setup_worker.sh runs no worker"
    live.procs.stop("server")
    started = time.monotonic()
    script.send_signal(signal.SIGTERM)  # the script alone, as a service manager would signal it
    script.wait(60)
    assert time.monotonic() - started < int(live.env["DATAWORTH_WORKER_STOP_S"]) + 30
    assert not wait_for_gone([worker]), "the worker outlived its set-up script"


def idle_worker(script: int) -> int | None:
    """The pid of the worker that setup_worker.sh `script` runs, once it runs no flow-run process."""
    try:
        (worker,) = psutil.Process(script).children()
        return None if worker.children() else worker.pid
    except (psutil.NoSuchProcess, ValueError):  # not one child: the script is not (or no longer) waiting on it
        return None
