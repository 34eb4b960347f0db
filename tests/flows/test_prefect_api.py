"""The app of the command's own Prefect API server (flows/prefect_api.py): Prefect's own app, with every route
prepared ahead, so that requests find them prepared and prepare nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import fastapi.routing
import pytest
from starlette.testclient import TestClient

from flows.prefect_api import PARENT_PIPE_ENV, prepare_routes


def test_every_route_is_prepared_ahead_and_requests_prepare_none(monkeypatch):
    from prefect.server.api.server import create_app

    app = create_app(ephemeral=True, webserver_only=True)
    prepared = prepare_routes(app)
    assert prepared >= 100  # Prefect's API: about 190 routes in 30 routers

    built = []
    original = fastapi.routing._EffectiveRouteContext.from_api_route
    monkeypatch.setattr(
        fastapi.routing._EffectiveRouteContext,
        "from_api_route",
        classmethod(lambda cls, **kw: built.append(kw) or original(**kw)),
    )
    with TestClient(app) as client:
        assert client.get("/api/health").json() is True
        assert client.post("/api/flows/filter", json={}).status_code == 200
    assert built == []  # already prepared: nothing built on the way to the last router
    assert prepare_routes(app) == prepared  # cached: the same routes, nothing new


def test_a_plain_app_without_included_routers_is_left_alone():
    app = fastapi.FastAPI()

    @app.get("/x")
    def x() -> int:
        return 1

    assert prepare_routes(app) == 0
    assert TestClient(app).get("/x").json() == 1


@pytest.mark.timeout(300)
def test_the_server_stops_itself_when_its_command_is_gone_before_any_watchdog(tmp_path):
    """The command's server reads its stdin, a pipe only the command holds: killed before it could start a
    watchdog (the pipe then closes at once), the command leaves no server behind, even one still booting."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, PARENT_PIPE_ENV: "1", "PREFECT_HOME": str(tmp_path), "PREFECT_UI_ENABLED": "0"}
    env.pop("PREFECT_API_URL", None)
    args = [sys.executable, "-m", "uvicorn", "--app-dir", str(root), "--factory", "flows.prefect_api:create_app"]
    server = subprocess.Popen(
        [*args, "--host", "127.0.0.1", "--port", "0", "--log-level", "error", "--lifespan", "on"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        server.stdin.close()  # what the command's death does to the pipe
        deadline = time.monotonic() + 120
        while server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.poll() is not None, "the server outlived its command's pipe"
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
