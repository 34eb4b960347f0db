"""The app of the Prefect API server a command starts for itself (flows.runner.OwnAPI): Prefect's own app
(`prefect.server.api.server.create_app`, as `prefect server start` and Prefect's ephemeral server serve it), with
its request routing prepared in a thread as soon as the app exists.

FastAPI (0.150) prepares an included router's routes (their dependencies, parameter and body models) on the first
request routed through that router, and a request walks every router ahead of its own: the first requests of a
flow run paid for most of Prefect's 30 routers, a second of this server's CPU while the command waited for its
answers. Prepared in a thread here, that work runs while the command is still importing its own modules. This
module imports nothing of dataworth's: it runs in the server's process."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

log = logging.getLogger(__name__)
# Set by flows.runner.OwnAPI: this server's stdin is a pipe that only the command holds open.
PARENT_PIPE_ENV = "DATAWORTH_API_PARENT_PIPE"


def create_app() -> Any:
    """Prefect's API app, its routes being prepared in a daemon thread (uvicorn `--factory` entry point); with
    PARENT_PIPE_ENV set, the server stops itself once its command is gone (watch_parent)."""
    if os.environ.get(PARENT_PIPE_ENV) == "1":
        watch_parent()
    from prefect.server.api.server import create_app as prefect_app

    app = prefect_app()
    threading.Thread(target=prepare_routes, args=(app,), name="prepare-routes", daemon=True).start()
    return app


def prepare_routes(app: Any) -> int:
    """Build what FastAPI builds on a router's first request, for every router included in `app` and in the FastAPI
    apps mounted in it; returns the routes prepared. FastAPI caches it under a lock, so requests served meanwhile
    wait for or reuse it. A FastAPI without lazily prepared routers (older or newer internals) is left as it is."""
    try:
        from fastapi import FastAPI
        from fastapi.routing import _IncludedRouter
        from starlette.routing import Mount
    except ImportError:
        return 0

    def walk_included(included: Any) -> int:
        count = 0
        for candidate in included.effective_candidates():
            count += walk_included(candidate) if isinstance(candidate, _IncludedRouter) else 1
        return count

    def walk(router: Any) -> int:
        count = 0
        for route in getattr(router, "routes", []):
            if isinstance(route, _IncludedRouter):
                count += walk_included(route)
            elif isinstance(route, Mount) and isinstance(route.app, FastAPI):
                count += walk(route.app.router)
        return count

    try:
        return walk(app.router)
    except Exception:  # noqa: BLE001 - an optimization: the first requests prepare what is left, as without it
        log.debug("preparing the API's routes ahead failed; left to the first requests", exc_info=True)
        return 0


def watch_parent(grace: float = 5.0) -> threading.Thread:
    """Stop this process when the command that started it ends, however it ends: its stdin is a pipe only the
    command holds, so end-of-file means the command is gone. The pipe exists from the moment this process does,
    so a command killed while its server boots leaves nothing (a watchdog the command starts after the server,
    flows.runner._watch, misses a kill between the two starts). SIGTERM (uvicorn shuts down), SIGKILL after
    `grace` seconds."""

    def run() -> None:
        try:
            while sys.stdin.buffer.read(65536):
                pass
        except (OSError, ValueError):  # no stdin to watch
            return
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=run, name="parent-watch", daemon=True)
    thread.start()
    return thread
