"""The app of the command's own Prefect API server (flows/prefect_api.py): Prefect's own app, with every route
prepared ahead, so that requests find them prepared and prepare nothing."""

from __future__ import annotations

import fastapi.routing
from starlette.testclient import TestClient

from flows.prefect_api import prepare_routes


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
