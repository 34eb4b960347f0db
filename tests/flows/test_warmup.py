"""The CLI's start-up: warm-up steps run while the API boots, the rest in a thread after, in order, failures left for
the flow; the garbage collector is off during the imports and back as it was after."""

from __future__ import annotations

import gc
import sqlite3
import threading
from functools import partial

from dataworth.config import IndexConfig, QueryConfig, RunnerConfig, TrackingConfig
from flows.runner import EarlyAPI
from flows.warmup import freeze_before_exit, imports_frozen, warm_behind, warm_steps, warm_while


def index_config(tmp_path, **update) -> IndexConfig:
    data = {"model": {"name_or_path": "gpt2"}, "data": {"dataset": "c.jsonl"}, "index_uri": str(tmp_path / "i")}
    return IndexConfig.model_validate({**data, **update})


def test_steps_run_in_order_while_waiting_and_failures_are_left_for_the_flow():
    ran: list[str] = []

    def fail():
        ran.append("fail")
        raise OSError("left for the flow")

    steps = [partial(ran.append, "a"), fail, partial(ran.append, "b"), partial(ran.append, "c")]
    waiting = iter([True, True, True, False])
    assert warm_while(lambda: next(waiting), steps) == 3
    assert ran == ["a", "fail", "b"]
    assert warm_while(lambda: False, steps) == 0 and len(ran) == 3  # the API is up: nothing done ahead


def test_the_rest_runs_in_a_thread_in_order():
    ran: list[str] = []
    main = threading.get_ident()

    def fail():
        ran.append("fail")
        raise ImportError("left for the flow")

    thread = warm_behind([partial(ran.append, "a"), fail, lambda: ran.append(threading.get_ident() != main)])
    thread.join(30)
    assert not thread.is_alive() and thread.daemon and ran == ["a", "fail", True]
    assert warm_behind([]) is None


def test_steps_follow_the_config(tmp_path):
    names = [getattr(s, "args", ("",))[0] for s in warm_steps("index", index_config(tmp_path))]
    assert isinstance(names[0], TrackingConfig) and names[1:] == ["datasets", "transformers.modeling_utils"]
    off = index_config(tmp_path, tracking={"enabled": False}, runner=RunnerConfig(kind="dask").model_dump())
    # no tracking; the model loads in the Dask workers; the corpus is read here
    assert [s.args[0] for s in warm_steps("index", off)] == ["datasets"]
    query = QueryConfig.model_validate({"index_uri": str(tmp_path / "i"), "tracking": {"enabled": False}})
    assert [s.args[0] for s in warm_steps("query", query)] == ["transformers.modeling_utils"]  # SVG histograms
    assert [s.args[0] for s in warm_steps("evaluate", query)][1:] == [
        "matplotlib.figure",
        "matplotlib.backends.backend_agg",
    ]


def test_open_store_makes_the_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    warm_steps("index", index_config(tmp_path, tracking={"tracking_uri": uri}))[0]()
    tables = {r[0] for r in sqlite3.connect(tmp_path / "ml.db").execute("select name from sqlite_master")}
    assert {"experiments", "runs", "metrics"} <= tables


def test_gc_off_during_imports_and_restored(tmp_path):
    assert gc.isenabled()
    with imports_frozen():
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() > 0
    gc.disable()
    try:
        with imports_frozen():
            pass
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()
    freeze_before_exit()
    gc.unfreeze()  # the rest of the test session collects as usual


def test_booting_is_true_while_the_api_starts(monkeypatch):
    import threading

    release = threading.Event()
    monkeypatch.setattr(EarlyAPI, "_start", lambda self: release.wait(30))
    monkeypatch.setattr("flows.runner._server_configured", lambda: True)  # no server process for this test
    api = EarlyAPI()
    assert api.booting()
    release.set()
    api.wait()
    assert not api.booting()
