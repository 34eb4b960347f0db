"""The CLI's own Prefect API server (flows/runner.py OwnAPI, EarlyAPI): started only when no server is configured,
a real server the flow runs against, stopped after; a configured server starts nothing (or stops the one started
before the settings were read); a server that does not answer in time is a clear error."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prefect import flow
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, get_current_settings, temporary_settings

from dataworth.config import IndexConfig, RunnerConfig
from flows import runner
from flows.runner import EarlyAPI, OwnAPI, own_api_url, run_flow


@flow(name="own-api-probe")
def probe() -> str:
    from prefect.runtime import flow_run

    return flow_run.id


def _ended(process, within: float = 30) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def fresh(monkeypatch):
    """No OwnAPI started by this process yet."""
    monkeypatch.setattr(runner, "_own_api", [])


@pytest.fixture
def no_server(fresh):
    """No Prefect server configured (the session's test harness may have set one)."""
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


@pytest.mark.timeout(300)
def test_own_api_runs_the_flow_and_stops(no_server):
    api = EarlyAPI()
    server = api._server
    assert server is not None and server.process.poll() is None  # started at once, before any wait
    api.wait()
    assert api.url == server.api_url == own_api_url()
    with urllib.request.urlopen(f"{api.url}/health", timeout=10) as answer:
        assert answer.status == 200
    with api.settings():
        assert PREFECT_API_URL.value() == api.url and PREFECT_UI_URL.value() == ""  # no "View at" link
        assert get_current_settings().flows.heartbeat_frequency is None  # no zombie-flow watch on this server
        run_id = probe()
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            assert str(client.read_flow_run(run_id).id) == str(run_id)  # recorded by this very server
    assert PREFECT_API_URL.value() is None  # the settings are back as they were
    with temporary_settings({"flows.heartbeat_frequency": 60}), api.settings():
        assert get_current_settings().flows.heartbeat_frequency == 60  # asked for: kept
    process = server.process
    server.stop()
    assert _ended(process)


def test_a_configured_server_starts_nothing(harness, fresh):
    configured = PREFECT_API_URL.value()  # the test harness's server
    assert configured
    api = EarlyAPI()
    api.wait()
    assert api._server is None and api.url is None and own_api_url() is None
    with api.settings():
        assert PREFECT_API_URL.value() == configured


@pytest.mark.timeout(300)
def test_the_server_started_early_is_stopped_when_the_settings_name_one(harness, fresh, monkeypatch):
    """Before Prefect is imported the CLI knows only the environment: it starts a server at once, and stops it when
    Prefect's settings (a profile, prefect.toml, .env) turn out to name a server."""
    monkeypatch.setattr(runner, "_server_configured", lambda: False)  # as when prefect is not imported yet
    launched = []
    launch = OwnAPI._launch

    def spy(self):
        launched.append(launch(self))
        return launched[-1]

    monkeypatch.setattr(OwnAPI, "_launch", spy)
    api = EarlyAPI()  # the harness's server is in Prefect's settings, not in the environment
    api.wait()
    assert api.url is None and own_api_url() is None
    assert len(launched) == 1 and _ended(launched[0])


@pytest.mark.timeout(300)
def test_a_server_that_does_not_answer_in_time_is_a_clear_error(no_server):
    server = OwnAPI()
    process = server.process
    with pytest.raises(RuntimeError, match=r"did not answer on http://127\.0\.0\.1:\d+/api within 0 s.*API_URL"):
        server.wait_ready(0.001)
    assert _ended(process)  # killed


def test_pool_runner_refuses_the_commands_own_server(no_server, monkeypatch, tmp_path):
    class Fake:
        api_url = "http://127.0.0.1:9/api"

    monkeypatch.setattr(runner, "_own_api", [Fake()])
    cfg = IndexConfig.model_validate(
        {
            "model": {"name_or_path": "gpt2"},
            "data": {"dataset": "c.jsonl"},
            "index_uri": str(tmp_path / "i"),
            "runner": RunnerConfig(kind="pool").model_dump(),
        }
    )
    with temporary_settings({PREFECT_API_URL: Fake.api_url}):
        with pytest.raises(ValueError, match="runner kind=pool needs the Prefect server"):
            run_flow(probe, cfg)
