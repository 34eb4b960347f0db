"""What every task shares: the retry rule, the cache policy, a per-process model cache, and opening
an index's own model, projections and curvature (the query side of every scoring task)."""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import torch
from prefect.cache_policies import INPUTS, TASK_SOURCE
from pydantic import BaseModel, ConfigDict

from dataworth.attribution.curvature import Curvature
from dataworth.attribution.gradients import query_gradients
from dataworth.attribution.projection import FittedProjections
from dataworth.config import GenerationConfig, ModelConfig, QuerySpec
from dataworth.data import pad_token_id
from dataworth.errors import is_retryable
from dataworth.model import context_length, load_model
from dataworth.queries import EncodedQuery, encode_queries
from storage import IndexManifest, IndexStore

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

_models: dict[str, tuple] = {}
_lock = threading.Lock()
# Hooks live on the shared model object: two threads collecting on it at once would mix
# their activations, so model work in one process is serialized (scale out with processes).
MODEL_LOCK = threading.Lock()


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
