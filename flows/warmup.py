"""A command's start-up: the garbage collector kept off the imports, and work its flow would do anyway in this
process, done while the CLI waits for Prefect's ephemeral API to boot (a process of its own: seconds, tens of
seconds on a new PREFECT_HOME) instead of after it: the MLflow store (mlflow's import, and a new sqlite store's
tables) and transformers' model code (most of loading a model).

What the boot left undone goes on in a thread of its own (warm_behind) while the flow's first requests wait on the
API's first answers (most of a second of this thread blocked on a socket). Only what the flow will do anyway is
warmed (steps follow the config: no tracking, no store; a model loaded by Dask's workers, no model code), and a
step that fails is left for the flow, which does the same work and reports its failure."""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from dataworth.config import TrackingConfig

log = logging.getLogger(__name__)
# Commands whose flow draws matplotlib figures (the evaluation report's plots; the query report's histograms are SVG).
REPORTS = ("evaluate", "demo")


def warm_steps(command: str, config: Any) -> list[Callable[[], object]]:
    """What the flow of `command` with `config` will need in this process, in the order it needs them."""
    steps: list[Callable[[], object]] = []
    tracking = getattr(config, "tracking", None)
    if isinstance(tracking, TrackingConfig) and tracking.enabled:  # every flow opens its run first
        from tasks.tracking import open_store

        steps.append(partial(open_store, tracking))
    if command == "index":  # the flow reads the corpus (dataworth.data) before any model
        steps.append(partial(importlib.import_module, "datasets"))
    runner = getattr(config, "runner", None)
    if runner is None or runner.kind != "dask":  # the model is loaded in this process (not by Dask's workers)
        steps.append(partial(importlib.import_module, "transformers.modeling_utils"))
    if command in REPORTS:  # the evaluation report's plots (dataworth.reports.html.figure)
        steps += [partial(importlib.import_module, m) for m in ("matplotlib.figure", "matplotlib.backends.backend_agg")]
    return steps


def warm_while(waiting: Callable[[], bool], steps: list[Callable[[], object]]) -> int:
    """Run `steps` in order while `waiting()` holds; returns how many ran."""
    done = 0
    for step in steps:
        if not waiting():
            break
        try:
            step()
        except Exception:  # noqa: BLE001 - the flow does the same work and reports what fails
            log.debug("warm-up step %r failed; left for the flow", step, exc_info=True)
        done += 1
    return done


def warm_behind(steps: list[Callable[[], object]]) -> threading.Thread | None:
    """Run `steps` in order in a daemon thread (None when there are none). The flow doing the same work meanwhile
    is safe: an import waits for the module the thread is importing, and the MLflow store is made under a lock
    (tasks.tracking.tracking_client)."""
    if not steps:
        return None
    thread = threading.Thread(target=warm_while, args=(lambda: True, steps), name="dataworth-warm", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def imports_frozen() -> Iterator[None]:
    """No garbage collection while the block imports a flow's modules, whose objects then move to the collector's
    permanent generation (gc.freeze), which no collection walks again.

    A command imports torch, transformers, lancedb, prefect and mlflow: millions of objects, nearly all alive
    until the process ends, which every full collection walked again (2.5–3 s of a `dataworth query` here, ten
    full collections), and again at exit, where the interpreter's final collections took 3 s more."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def freeze_before_exit() -> None:
    """Move everything alive now to the permanent generation: the process ends next, and the interpreter's
    collections at exit then walk only what was made since. What that leaves uncollected is cyclic garbage, whose
    memory goes back with the process (Python never promised to finalize it at exit)."""
    gc.freeze()
