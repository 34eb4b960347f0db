"""The tasks' torch work runs on one thread per process (tasks.common.COMPUTE).

The rule it serves (libgomp, torch's OpenMP): every thread that has run a parallel region keeps its own pool of
workers for as long as it lives, and once the pools' threads outnumber the cores no pool's idle workers spin
between regions. A process whose tasks ran torch on several of Prefect's worker threads then ran every later
pass slower (measured on 2 cores: a logging pass took 0.72-0.79 s on a second thread against 0.39-0.46 s with one
thread's pool alive). No timing here: these tests check where the work runs, and that handing it over loses
nothing (results, exceptions, the caller's context, forks, pickling).
"""

from __future__ import annotations

import contextvars
import multiprocessing
import os
import pickle
import threading

import pytest

import tasks.common
import tasks.evaluate
import tasks.index
import tasks.query
import tasks.tokenwise
from tasks.common import COMPUTE, on_compute_thread

ON_COMPUTE = "dataworth-compute"
VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def test_work_runs_on_one_named_thread_and_returns_its_result():
    names = {COMPUTE.run(lambda: threading.current_thread().name) for _ in range(3)}
    assert len(names) == 1 and names.pop().startswith(ON_COMPUTE)
    assert COMPUTE.run(lambda a, b=0: a + b, 2, b=3) == 5


def test_errors_reach_the_caller_and_the_thread_goes_on():
    def fail():
        raise ValueError("bad input: the fix")

    with pytest.raises(ValueError, match="bad input: the fix"):
        COMPUTE.run(fail)
    assert COMPUTE.run(lambda: 1) == 1


def test_a_call_on_the_compute_thread_runs_at_once_not_queued_behind_itself():
    # Queued, the inner call would wait for the outer one, which waits for it: a deadlock (the timeout fails it).
    inner = on_compute_thread(lambda: threading.current_thread().name)
    outer = on_compute_thread(lambda: (threading.current_thread().name, inner()))
    result = []
    t = threading.Thread(target=lambda: result.append(outer()), daemon=True)
    t.start()
    t.join(timeout=30)
    assert result and result[0][0] == result[0][1] and result[0][0].startswith(ON_COMPUTE)


def test_the_callers_context_goes_with_the_work():
    token = VAR.set("from the caller")
    try:
        assert COMPUTE.run(VAR.get) == "from the caller"
    finally:
        VAR.reset(token)
    assert COMPUTE.run(VAR.get) == "unset"


def test_an_unpickled_copy_is_the_receiving_processs_own():
    assert pickle.loads(pickle.dumps(COMPUTE)) is COMPUTE


def _in_child(out) -> None:
    try:
        out.put(tasks.common.COMPUTE.run(lambda: threading.current_thread().name))
    except BaseException:  # noqa: BLE001 - the parent reports it
        import traceback

        out.put(traceback.format_exc())
    # Leave without the interpreter's teardown: a fork of a process that has used LanceDB (not fork-safe, it warns)
    # may fail there, which says nothing of the compute thread.
    out.close()
    out.join_thread()
    os._exit(0)


def test_a_forked_child_makes_its_own_thread():
    COMPUTE.run(lambda: None)  # the parent's thread exists before the fork
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_in_child, args=(out,))
    child.start()
    got = out.get(timeout=60)  # the name of the thread the child's work ran on, or the child's traceback
    child.join(timeout=60)
    assert got.startswith(ON_COMPUTE), got
    assert child.exitcode == 0


TORCH_TASKS = [
    tasks.index.fit_projections,
    tasks.index.fit_curvature,
    tasks.query.score_queries,
    tasks.query.query_gradients,
    tasks.query.score_shard_range,
    tasks.tokenwise.tokenwise_scores,
    tasks.evaluate.tail_patch_eval,
    tasks.evaluate.retrain_and_measure,
    tasks.evaluate.store_precision_eval,
    tasks.evaluate.loo_eval,
    tasks.evaluate.kronfluence_eval,
    tasks.evaluate.calibrate_damping,
]


@pytest.mark.parametrize("task", TORCH_TASKS, ids=lambda t: t.name)
def test_tasks_that_run_torch_run_on_the_compute_thread_with_their_own_source(task):
    """Each body is handed to the compute thread; its cache key still hashes its own source (not the wrapper's, which
    every such task shares: equal inputs of two tasks would then share a cached result)."""
    assert task.fn.__wrapped__.__name__ == task.fn.__name__
    assert f"def {task.fn.__name__}(" in task.source_code and "COMPUTE.run(fn" not in task.source_code


def test_a_task_shipped_to_a_dask_worker_uses_that_processs_compute_thread():
    # Dask ships task functions by pickling them with their globals (cloudpickle, by value for closures).
    import cloudpickle

    shipped = pickle.loads(cloudpickle.dumps(tasks.index.fit_curvature.fn))
    assert shipped.__globals__["COMPUTE"] is COMPUTE
