"""The `log-shards` flow: a range of an index's gradient shards, logged by one flow run on a work pool's worker;
and the index flow's side of it (RunnerConfig kind=pool), which submits those runs as its subflows.

Prefect does the spreading: each range is a flow run of the `log-shards` deployment, taken by whichever worker of
the deployment's pool polls first. A run whose worker died is marked Crashed by the zombie-flow automation
(deployments/zombie-flows.yaml: flow-run heartbeats that stop) and its range is submitted again; shard writes are
idempotent, so a shard the dead run had already written is stored once.
"""

from __future__ import annotations

import os
import typing
from collections import deque
from collections.abc import Iterator
from functools import cache
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from dataworth.config import RunnerConfig
from flows.runner import in_window
from storage import IndexStore
from tasks.index import log_gradients

# One process per run: one shard computing, one waiting for the model, one writing (as the index flow does).
IN_PROCESS_WINDOW = 3


class ShardJob(BaseModel):
    """One shard for log_gradients, and how the index flow wants it logged."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shard: int = Field(ge=0, description="Shard number.")
    shard_hash: str = Field(description="Content hash of the shard's examples (its cache key).")
    new: bool = Field(description="The index flow saw no rows of this shard stored: write it as one append.")
    refresh: bool = Field(description="Log it even when a cached result exists (overwrite, or a missing shard).")


@cache
def _argument_types() -> dict[str, TypeAdapter]:
    hints = typing.get_type_hints(log_gradients.fn)
    return {name: TypeAdapter(hint) for name, hint in hints.items() if name != "return"}


def typed_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """`arguments` as log_gradients declares them: flow parameters arrive as JSON, a config as a dict."""
    types = _argument_types()
    unknown = sorted(set(arguments) - set(types))
    if unknown:
        raise ValueError(
            f"log_gradients takes no argument {', '.join(unknown)}; the pool's workers run other dataworth code than "
            "the index flow: install the same version on both"
        )
    return {name: types[name].validate_python(value) for name, value in arguments.items()}


@flow(name="log-shards", persist_result=True, result_serializer="json")
def log_shards(jobs: list[ShardJob], arguments: dict[str, Any]) -> list:
    """Log each job's shard with log_gradients (`arguments`: its other keyword arguments, as the index flow passes
    them); return the LoggedShard results in the order of `jobs`."""
    kwargs = typed_arguments(arguments)

    def submit(job: ShardJob):
        return log_gradients.with_options(refresh_cache=job.refresh).submit(
            shard=job.shard, shard_hash=job.shard_hash, new=job.new, **kwargs
        )

    def finished(future):
        shard = future.result()
        return shard.as_cached() if future.state.name == "Cached" else shard  # nothing computed by this run

    logged = {job.shard: finished(future) for job, future in in_window(submit, jobs, IN_PROCESS_WINDOW)}
    return [logged[job.shard] for job in jobs]


def check_deployment(name: str) -> None:
    """Refuse a pool run before any work when the shard deployment is not there."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ValueError(
                f"runner kind=pool: no deployment {name!r} on the Prefect server; deploy it with `prefect deploy "
                "--prefect-file deployments/prefect.yaml --name log-shards` and start workers with "
                "deployments/setup_worker.sh"
            ) from None


def for_workers(arguments: dict[str, Any]) -> dict[str, Any]:
    """log_gradients' arguments as JSON, with local relative paths (the index, a model directory) made absolute: a
    worker runs in its own working directory (the deployment's DATAWORTH_ROOT), not the caller's."""
    args = TypeAdapter(dict[str, Any]).dump_python(arguments, mode="json")
    local = IndexStore(args["index_uri"]).local_path
    if local is not None:
        args["index_uri"] = os.path.abspath(local)
    model = args["model"]
    for key in ("name_or_path", "tokenizer"):
        if model.get(key) and os.path.exists(model[key]):  # else a hub name
            model[key] = os.path.abspath(model[key])
    return args


def log_on_pool(runner: RunnerConfig, jobs: list[ShardJob], arguments: dict[str, Any]) -> Iterator[tuple[int, Any]]:
    """Log `jobs` as flow runs of runner.shards_deployment (runner.shards_per_run shards each, at most
    runner.runs_in_flight at once, subflows of the calling flow run); yield (shard, LoggedShard) as runs finish.

    A run that crashed (its worker died: the zombie-flow automation marks it Crashed) is submitted again, at most
    runner.resubmits times per range, with new=False: the dead run may have written some of its shards, and a
    rewrite replaces them. A failed run raises its error, as a failed task would.
    """
    from prefect.deployments import run_deployment
    from prefect.futures import PrefectFlowRunFuture, as_completed

    check_deployment(runner.shards_deployment)
    log = get_run_logger()
    args = for_workers(arguments)
    step = runner.shards_per_run
    todo = deque(tuple(jobs[i : i + step]) for i in range(0, len(jobs), step))
    tries: dict[int, int] = {}
    pending: dict[PrefectFlowRunFuture, tuple[ShardJob, ...]] = {}
    while todo or pending:
        while todo and len(pending) < runner.runs_in_flight:
            chunk = todo.popleft()
            run = run_deployment(
                runner.shards_deployment,
                parameters={"jobs": [j.model_dump() for j in chunk], "arguments": args},
                flow_run_name=f"log-shards-{chunk[0].shard}-{chunk[-1].shard}",
                timeout=0,  # submitted, not awaited: the window waits on every run at once
            )
            pending[PrefectFlowRunFuture(run.id)] = chunk
        done = next(as_completed(list(pending)))
        chunk = pending.pop(done)
        if done.state.is_crashed() and tries.get(chunk[0].shard, 0) < runner.resubmits:
            tries[chunk[0].shard] = tries.get(chunk[0].shard, 0) + 1
            log.warning(
                "shards %d..%d: flow run %s crashed (%s); submitting them again",
                chunk[0].shard,
                chunk[-1].shard,
                done.flow_run_id,
                done.state.message,
            )
            todo.appendleft(tuple(j.model_copy(update={"new": False}) for j in chunk))
            continue
        for shard in done.result():
            yield shard.shard, shard
