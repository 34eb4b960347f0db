"""What every task shares: the retry rule, the cache policy, a per-process model cache, and opening
an index's own model, projections and curvature (the query side of every scoring task)."""

from __future__ import annotations

import contextvars
import functools
import io
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, ParamSpec, TypeVar

import numpy as np
import torch
from prefect.cache_policies import INPUTS, TASK_SOURCE
from pydantic import BaseModel, ConfigDict

from dataworth.attribution.curvature import Curvature
from dataworth.attribution.gradients import query_gradients
from dataworth.attribution.projection import FittedProjections
from dataworth.config import GenerationConfig, ModelConfig, QuerySpec, ScoreConfig
from dataworth.data import pad_token_id
from dataworth.errors import is_retryable
from dataworth.fingerprint import check_model_fingerprint
from dataworth.model import context_length, load_model
from dataworth.queries import EncodedQuery, encode_queries
from storage import IndexManifest, IndexStore
from storage.store import batch_buffer

# Cached across runs on (inputs + task source). No task takes an MLflow run id: tasks return their
# metrics and the flow logs them, so a cached result still reports into the run that reuses it.
CACHE = INPUTS + TASK_SOURCE


class StageResult(BaseModel):
    """What a task returns: small, serializable, and carrying the metrics the flow logs to MLflow."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def metrics(self) -> dict[str, float]:
        """What the flow logs to MLflow for this stage."""
        return {}


REBUILD = "rebuild the index (dataworth index ... --overwrite)"


def retry_on_io(task, task_run, state) -> bool:
    """Retry only transient I/O failures; a ValueError (bad input) is never retried."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the rule decides, see dataworth.errors.is_retryable
        return is_retryable(exc)
    return False


IO_RETRIES = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_on_io)
# Persisted task results as JSON (pydantic models are rebuilt by class name), never pickle: a result store read
# back by another process or machine executes no code from it.
PERSIST = dict(persist_result=True, result_serializer="json")

_models: dict[str, tuple] = {}
_lock = threading.Lock()


class _ModelLock:
    """The process's model lock. Prefect ships a task to a Dask worker by pickling its function with its
    globals; a lock cannot be pickled and a copy would lock nothing, so this one unpickles as the receiving
    process's own MODEL_LOCK."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)

    def __reduce__(self) -> tuple:
        return (_model_lock, ())


def _model_lock() -> _ModelLock:
    return MODEL_LOCK


# Hooks live on the shared model object: two threads collecting on it at once would mix
# their activations, so model work in one process is serialized (scale out with processes).
MODEL_LOCK = _ModelLock()

P = ParamSpec("P")
R = TypeVar("R")
_COMPUTE_THREAD = "dataworth-compute"


class _ComputeThread:
    """The one long-lived thread of a process that runs the tasks' torch work.

    Why one: torch's CPU kernels run on OpenMP (libgomp), which keeps a pool of worker threads for every thread
    that has run a parallel region, for as long as that thread lives. Once the pools' threads outnumber the cores,
    libgomp stops letting idle workers spin between regions, and every region pays for waking them. Tasks run on
    Prefect's worker threads, which live as long as the flow run, so a flow whose tasks did torch work on two
    threads ran every later forward/backward pass at about 0.6× the speed of one thread's: 0.72-0.79 s against
    0.39-0.46 s for one logging pass over 256 docstrings (2 cores; tests/tasks/test_compute_thread.py states the
    rule, the README the measurement). The tasks' compute is therefore handed to this thread and awaited. Model
    work was serialized anyway (MODEL_LOCK); in-process scoring ranges on threads (score_shard_range) now run one
    at a time too. Streaming passes still read on a second thread (`prefetched`), for as long as the pass lasts.

    The caller's context (Prefect's run context, so get_run_logger and the task's run count) goes with the work.
    A forked child starts without the thread and makes its own; an unpickled copy (a task shipped to a Dask worker)
    is the receiving process's own."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """fn(*args, **kwargs) on the compute thread, waited for; at once when called on it."""
        if threading.current_thread().name.startswith(_COMPUTE_THREAD):
            return fn(*args, **kwargs)
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix=_COMPUTE_THREAD)
            executor = self._executor
        return executor.submit(contextvars.copy_context().run, fn, *args, **kwargs).result()

    def _forget(self) -> None:  # in a forked child: the parent's thread does not exist there
        self._executor, self._lock = None, threading.Lock()

    def __reduce__(self) -> tuple:
        return (_compute_thread, ())


def _compute_thread() -> _ComputeThread:
    return COMPUTE


COMPUTE = _ComputeThread()
os.register_at_fork(after_in_child=COMPUTE._forget)


def on_compute_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """Run every call of `fn` on the process's compute thread (COMPUTE); for a task's body, under `@task` (its
    source, signature and annotations stay the function's own, so its cache key does too)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return COMPUTE.run(fn, *args, **kwargs)

    return run


def cached_model(cfg: ModelConfig):
    """(model, tokenizer), loaded once per worker process: shards of one run share it."""
    key = cfg.fingerprint()
    with _lock:
        if key not in _models:
            _models.clear()  # keep one model resident, never two
            _models[key] = load_model(cfg)
        return _models[key]


def peak_memory_mb() -> float:
    """Peak device memory of this process: CUDA allocations when on GPU, else the resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_projections(store: IndexStore, key: str | None) -> FittedProjections | None:
    """The KFAC-whitened projections stored under `key`; None for plain random projections."""
    if key is None:
        return None
    blob = store.read_artifact(key)
    if blob is None:
        raise ValueError(f"index {store.uri!r} lists fitted projections {key!r} but they are missing; {REBUILD}")
    return FittedProjections.from_bytes(blob)


def published_manifest(store: IndexStore) -> IndexManifest:
    manifest = store.read_manifest()
    if manifest is None:
        raise ValueError(
            f"no published index at {store.uri!r}; build one first with `dataworth index` (an interrupted "
            "index run publishes nothing)"
        )
    return manifest


class IndexModel(NamedTuple):
    """An index's own model and tokenizer, its manifest, and its fitted projections (None if random)."""

    model: Any
    tokenizer: Any
    manifest: IndexManifest
    projections: FittedProjections | None


def open_index_model(index: str | IndexStore, manifest: IndexManifest | None = None, fresh: bool = False) -> IndexModel:
    """The model an index was built with, from its manifest (the published one unless given).

    The model is this process's shared copy (serialize work on it with MODEL_LOCK); `fresh=True`
    loads a private copy that the caller may train or otherwise change.
    """
    store = index if isinstance(index, IndexStore) else IndexStore(index)
    manifest = manifest or published_manifest(store)
    check_model_fingerprint(manifest.config.model, manifest.model_fingerprint, store.uri)
    lm, tokenizer = load_model(manifest.config.model) if fresh else cached_model(manifest.config.model)
    return IndexModel(lm, tokenizer, manifest, load_projections(store, manifest.projections_artifact))


def encode_index_queries(
    index: IndexModel, queries: list[QuerySpec], generation: GenerationConfig, batch_size: int
) -> list[EncodedQuery]:
    """Tokenize the queries for the index's model (generating missing completions), cut to its context.

    Call it holding MODEL_LOCK when the model is the shared copy.
    """
    limit = context_length(index.model, index.manifest.config.data.max_length)
    return encode_queries(index.model, index.tokenizer, queries, generation, limit, batch_size)


def index_query_gradients(
    index: IndexModel, queries: list[QuerySpec], generation: GenerationConfig, batch_size: int
) -> tuple[list[EncodedQuery], torch.Tensor]:
    """(encoded queries, their projected gradients [queries, dim]) with the index's own model and projections."""
    with MODEL_LOCK:
        encoded = encode_index_queries(index, queries, generation, batch_size)
        logging = index.manifest.config.logging
        q_grads = query_gradients(
            index.model, encoded, logging, pad_token_id(index.tokenizer), batch_size, index.projections
        )
    if q_grads.shape[1] != index.manifest.dim:
        raise ValueError(
            f"query gradients have {q_grads.shape[1]} dims, the index {index.manifest.dim}: "
            "the model or logging config no longer matches the index; rebuild it"
        )
    return encoded, q_grads


def index_curvature(store: IndexStore, manifest: IndexManifest, damping_factor: float | None) -> Curvature:
    """The index's fitted curvature, damped by the given factor, else by the calibrated one recorded in the
    manifest (`dataworth evaluate --calibrate`), else as fitted."""
    blob = store.read_artifact(manifest.curvature_artifact)
    if blob is None:
        raise ValueError(
            f"index {store.uri!r} lists curvature {manifest.curvature_artifact!r} but it is missing; {REBUILD}"
        )
    curvature = Curvature.from_bytes(blob)
    if damping_factor is None and manifest.calibration:
        damping_factor = manifest.calibration["damping_factor"]
    return curvature if damping_factor is None else curvature.with_damping(damping_factor)


def index_task_mix(score: ScoreConfig, manifest: IndexManifest) -> float:
    """trackstar's score.task_mix: the one given, else the calibrated one recorded in the manifest (`dataworth
    evaluate --calibrate` with trackstar), else the default."""
    if "task_mix" not in score.model_fields_set and manifest.calibration and "task_mix" in manifest.calibration:
        return float(manifest.calibration["task_mix"])
    return score.task_mix


T = TypeVar("T")


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield `items`, producing up to `depth` of them ahead in a background thread, so that reading the
    next stored batch overlaps the compute on the current one. Errors surface at the consumer."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put((end, exc))

    worker = threading.Thread(target=produce, name="dataworth-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = ready.get()
            if exc is not None:
                raise exc
            if item is end:
                return
            yield item
    finally:
        stop.set()  # a consumer that stops early releases the producer
        worker.join()


def gradient_batches(
    store: IndexStore, batch_size: int, version: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(example ids [n], vectors float32 [n, dim]) of the stored gradients, read one batch ahead of the caller."""
    # depth=1: one batch waits while the next is read, which keeps reading and scoring overlapped; each more
    # held a batch more in memory (16 MB at 4096 × 1024) at no measured gain.
    return prefetched(_gradient_tensors(store.iter_gradient_pieces(batch_size, version=version)), depth=1)


def _gradient_tensors(batches: Iterable[list[tuple[np.ndarray, ...]]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # One copy per batch, from the scanner's buffers into Arrow's memory pool (batch_buffer): a torch tensor
    # per batch would come from glibc, which keeps the freed ones in the reading thread's arena, so a scoring
    # pass's resident memory grew with the table. The copy is a torch op, run on the prefetch thread, on
    # purpose: with no torch work on that thread, the scoring thread's OpenMP workers spin-waited (libgomp)
    # against the reader and a scoring pass took twice the CPU time on 2 cores.
    for pieces in batches:
        rows = sum(len(ids) for ids, _, _ in pieces)
        vectors = torch.from_numpy(batch_buffer(rows, pieces[0][1].shape[1]))
        start = 0
        for ids, piece, _sq in pieces:
            # from_dlpack takes the read-only view without from_numpy's warning; nothing writes to it.
            vectors[start : start + len(ids)].copy_(torch.from_dlpack(piece))
            start += len(ids)
        yield torch.from_numpy(np.concatenate([ids for ids, _, _ in pieces])), vectors


def norms_key(curvature_artifact: str, curvature: Curvature) -> str:
    """Artifact key of the stored ‖(F+λI)^-1/2 g_i‖: one per fitted curvature (itself per gradients
    version) and damping factor."""
    damping = "identity" if curvature.kind == "identity" else repr(float(curvature.damping_factor))
    return f"norms-{curvature_artifact}-damping-{damping}"


def compute_norms(store: IndexStore, curvature: Curvature, version: int | None, batch_size: int = 4096) -> np.ndarray:
    """‖(F+λI)^-1/2 g_i‖ of every stored gradient in one streaming pass (float64), as a dense array
    indexed by example id (ids are 0..N-1; an id without a row is NaN)."""
    norms = np.full(0, np.nan)
    for ids, vectors in gradient_batches(store, batch_size, version):
        if not len(ids):
            continue
        top = int(ids.max()) + 1
        if top > norms.size:
            norms = np.concatenate([norms, np.full(max(top, 2 * norms.size) - norms.size, np.nan)])
        norms[ids.numpy()] = curvature.whitened_norms(vectors.to(torch.float64)).numpy()
    last = np.flatnonzero(~np.isnan(norms))
    return norms[: last[-1] + 1 if last.size else 0]


def logged_norms(store: IndexStore, version: int | None) -> np.ndarray | None:
    """‖g_i‖ of every stored gradient, dense by example id as compute_norms returns them, from the sq_norm column
    alone (no vector is read): the identity curvature's norms. None when the vectors are stored in a dtype other
    than float32, whose decoded values, and so norms, differ from the logged ones that sq_norm holds."""
    ids, sq, dtype = store.read_sq_norms(version)
    if dtype != "float32":
        return None
    norms = np.full(int(ids.max()) + 1 if len(ids) else 0, np.nan)
    norms[ids] = np.sqrt(sq.astype(np.float64))
    return norms


def write_array(store: IndexStore, key: str, array: np.ndarray) -> None:
    """Store a numpy array as an artifact of the index (.npy bytes, no pickle)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    store.write_artifact(key, buf.getvalue())


def read_array(store: IndexStore, key: str) -> np.ndarray | None:
    """The array write_array stored under `key`; None when there is none."""
    blob = store.read_artifact(key)
    return None if blob is None else np.load(io.BytesIO(blob), allow_pickle=False)


def store_norms(store: IndexStore, key: str, norms: np.ndarray) -> None:
    write_array(store, key, np.asarray(norms, dtype=np.float64))


read_norms = read_array


def stored_norms(
    store: IndexStore, manifest: IndexManifest, key: str, results: IndexStore | None = None
) -> np.ndarray | None:
    """The stored norms under `key`, one per example of the manifest: the index's (fit_curvature stores its own
    damping's there), else the results store's (a query stores any other damping's there); None when neither."""
    for source in (store, results):
        norms = None if source is None else read_norms(source, key)
        if norms is not None and norms.shape == (manifest.num_examples,):
            return norms
    return None


def index_norms(
    store: IndexStore,
    manifest: IndexManifest,
    curvature: Curvature,
    batch_size: int = 4096,
    results: IndexStore | None = None,
) -> torch.Tensor:
    """‖(F+λI)^-1/2 g_i‖ per example id for this damping of the index's curvature: stored by fit_curvature for
    the index's own damping; computed once (one streaming pass) and stored for any other, in `results` when
    given (a query never writes the index), else in the index."""
    key = norms_key(manifest.curvature_artifact, curvature)
    norms = stored_norms(store, manifest, key, results)
    if norms is None or np.isnan(norms).any():
        norms = compute_norms(store, curvature, manifest.gradients_version, batch_size)
        if norms.shape != (manifest.num_examples,) or np.isnan(norms).any():
            raise ValueError(
                f"index {store.uri!r} stores gradients for {np.count_nonzero(~np.isnan(norms))} of example ids "
                f"0..{manifest.num_examples - 1}; {REBUILD}"
            )
        store_norms(results or store, key, norms)
    return torch.from_numpy(norms)
