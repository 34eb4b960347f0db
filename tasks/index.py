"""Index stages: tokenize → fit projections → log gradients (per shard) → fit curvature → publish.

Each task returns a small result that carries its metrics; the flow logs them to MLflow, so a
stage served from the Prefect cache still reports into the run that reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from datetime import timedelta
from typing import Any

import numpy as np
from prefect import get_run_logger, task
from prefect.runtime import task_run
from pydantic import Field

from dataworth.attribution.curvature import Curvature, fit_fisher
from dataworth.attribution.gradients import log_example_gradients
from dataworth.attribution.kfac import fit_projections as fit_data_projections
from dataworth.attribution.kfac import sample_indices
from dataworth.attribution.projection import FittedProjections, Layout, describe_layout, untracked_weights
from dataworth.config import AnnConfig, CurvatureConfig, DataConfig, IndexConfig, LoggingConfig, ModelConfig
from dataworth.data import Example, chunk_documents, load_documents
from dataworth.fingerprint import data_fingerprint, optimizer_fingerprint
from dataworth.model import load_tokenizer
from storage import (
    IndexBuildConfig,
    IndexManifest,
    IndexState,
    IndexStore,
    IndexStoreError,
    examples_table,
    squared_norms,
)

from .common import (
    CACHE,
    COMPUTE,
    IO_RETRIES,
    MODEL_LOCK,
    PERSIST,
    StageResult,
    cached_model,
    compute_norms,
    gradient_batches,
    load_projections,
    logged_norms,
    norms_key,
    on_compute_thread,
    peak_memory_mb,
    store_norms,
)


class Tokenized(StageResult):
    """The examples table written by tokenize_corpus."""

    examples_version: int = Field(description="Version of the examples table written.")
    examples: int = Field(description="Examples (≤ max_length-token chunks of documents).")
    documents: int = Field(description="Documents read.")
    tokens: int = Field(description="Tokens over all examples.")
    seconds: float = Field(description="Wall time of reading, tokenizing and writing.")
    shard_hashes: list[str] = Field(description="Content hash of each gradient shard's examples.")

    def metrics(self) -> dict[str, float]:
        return {
            "documents": self.documents,
            "examples": self.examples,
            "tokens": self.tokens,
            "tokenize_seconds": self.seconds,
        }


class FittedProjectionsResult(StageResult):
    """The KFAC-whitened projections stored by fit_projections."""

    artifact: str = Field(description="Artifact key of the stored projections.")
    digest: str = Field(description="Digest of the projections (busts the cache of every shard when refitted).")
    seconds: float = Field(description="Fitting time; 0 when reused.")
    reused: bool = Field(description="True when the index already stored these projections.")
    examples: int = Field(description="Examples whose tokens fitted the KFAC factors.")
    tokens: int = Field(description="Tokens the KFAC factors were fitted on.")
    meta: dict[str, Any] = Field(description="Everything FittedProjections.meta records.")

    def metrics(self) -> dict[str, float]:
        if self.reused:
            return {"precondition_reused": 1.0}
        return {"precondition_seconds": self.seconds, "precondition_tokens": self.tokens}


class LoggedShard(StageResult):
    """One shard of projected gradients written by log_gradients."""

    shard: int = Field(description="Shard number.")
    examples: int = Field(description="Examples in the shard.")
    tokens: int = Field(description="Tokens in the shard.")
    compute_seconds: float = Field(
        description="Gradient computation time (model forward/backward and projection, under MODEL_LOCK)."
    )
    write_seconds: float = Field(description="Time to store the shard (outside MODEL_LOCK: overlaps the next compute).")
    worker: str = Field(description="host:pid of the process that logged the shard.")
    peak_memory_mb: float = Field(description="Peak device memory of the worker process, in MiB.")
    layout: list[dict[str, Any]] = Field(description="Per-module blocks of the gradient vector (Layout.to_json).")
    dim: int = Field(description="Dimension of each gradient vector.")
    full_gradient_params: int = Field(description="Parameters of the tracked layers (the unprojected size).")
    reused: int = Field(
        0, description="Examples whose gradients were copied from the previous index version (unchanged documents)."
    )
    computed_tokens: int | None = Field(
        None, description="Tokens of the examples the model computed (all of them when none was reused)."
    )
    untracked_weights: dict[str, int] = Field(
        default_factory=dict,
        description="The model's weight tensors that no trackable layer holds (e.g. fused MoE experts): name → size "
        "(dataworth.attribution.projection.untracked_weights).",
    )

    @property
    def computed(self) -> int:
        """Examples whose gradients the model computed."""
        return self.examples - self.reused

    @property
    def tokens_computed(self) -> int:
        """Tokens of the examples the model computed (results from before reuse have no computed_tokens: all)."""
        return self.tokens if self.computed_tokens is None else self.computed_tokens

    def as_cached(self) -> LoggedShard:
        """This result as a run that found it in Prefect's cache sees it: the shard is stored, nothing computed."""
        return self.model_copy(update={"reused": self.examples, "computed_tokens": 0, "compute_seconds": 0.0})

    def metrics(self) -> dict[str, float]:
        out = {"peak_memory_mb": self.peak_memory_mb, "examples_reused": self.reused}
        if self.computed and self.compute_seconds > 0:
            out["log_tokens_per_s"] = self.tokens_computed / self.compute_seconds
            out["log_examples_per_s"] = self.computed / self.compute_seconds
        return out


class PreviousVersion(StageResult):
    """The published version an incremental run brings up to date: its unchanged documents' gradients are copied,
    not computed (valid only when the model, its fingerprint and the projections are the same)."""

    examples_version: int = Field(description="Examples table version the published index serves.")
    gradients_version: int = Field(description="Gradients table version the published index serves.")


class FittedCurvature(StageResult):
    """The curvature artifact written by fit_curvature."""

    artifact: str = Field(description="Artifact key of the fitted curvature.")
    examples: int = Field(description="Gradients the Fisher was accumulated over.")
    summary: str = Field(description="JSON summary of the fitted blocks.")
    seconds: float = Field(description="Streaming and eigendecomposition time.")

    def metrics(self) -> dict[str, float]:
        return {"curvature_seconds": self.seconds}


class Published(StageResult):
    """The manifest published by publish_index, and what the index occupies."""

    index_uri: str = Field(description="LanceDB URI of the index.")
    manifest: IndexManifest = Field(description="The manifest as published.")
    bytes_stored: int = Field(description="Bytes the index's tables occupy.")

    @property
    def compression_ratio(self) -> float:
        return self.manifest.full_gradient_params / max(self.manifest.dim, 1)

    def metrics(self) -> dict[str, float]:
        return {
            "bytes_stored": self.bytes_stored,
            "gradient_dim": self.manifest.dim,
            "compression_ratio": self.compression_ratio,
            "indexed_examples": self.manifest.num_examples,
        }


@task(name="index_state", **IO_RETRIES)
def index_state(index_uri: str) -> IndexState:
    """What an index holds now: its manifest (if published), tables and gradient shards."""
    return IndexStore(index_uri).state()


# Lance merges fragments into ones of up to 1M rows. Measured on 204,800 rows × 1024 dims (2 cores),
# a scan of the 2 merged fragments took 1.6-3× as long as one of the 400 shard fragments (fewer
# parallel reads), so compaction waits until per-fragment overhead dominates.
COMPACT_FRAGMENTS = 2048


@task(name="prune_index", **IO_RETRIES)
def prune_index(
    index_uri: str, drop_all: bool = False, keep_shards: int | None = None, reset: bool = False
) -> IndexState:
    """Drop the whole index (overwrite of an unpublished or damaged one); or empty its gradients as a new
    version (reset: overwrite of a published one, which queries keep reading at the versions its manifest
    pins until the rebuild publishes); or, once every shard is logged, drop gradient shards numbered
    keep_shards and above and compact the gradients, so the version returned (which curvature and the
    manifest record) is the compacted one."""
    store = IndexStore(index_uri)
    if drop_all:
        store.drop()
    elif reset:
        store.reset_gradients()
    elif keep_shards is not None:
        store.delete_shards_from(keep_shards)
        # Without a published manifest no reader pins an older version, so its files can go.
        store.compact_gradients(min_fragments=COMPACT_FRAGMENTS, keep_old_versions=store.exists())
    return store.state()


class AnnIndexBuilt(StageResult):
    """The vector index build_ann_index built on the gradients table."""

    gradients_version: int = Field(description="Gradients table version that carries the index (rows unchanged).")
    info: dict[str, Any] = Field(description="What was built (IndexStore.build_vector_index), for the manifest.")

    def metrics(self) -> dict[str, float]:
        return {"ann_build_seconds": self.info["build_seconds"], "ann_partitions": self.info["partitions"]}


@task(name="build_ann_index", **IO_RETRIES)
def build_ann_index(index_uri: str, ann: AnnConfig) -> AnnIndexBuilt:
    """LanceDB's vector index (metric dot) on the compacted gradients table, for the hybrid-ann-* score modes: one
    more table version, which curvature and the manifest then record. A dtype it cannot read is a ValueError."""
    try:
        info = IndexStore(index_uri).build_vector_index(ann.index_type, ann.partitions, ann.sub_vectors, ann.rq_bits)
    except IndexStoreError as exc:
        raise ValueError(str(exc)) from None  # bad input: never retried
    get_run_logger().info(
        "vector index %s on %d rows: %d partitions, %.1f s",
        info["index_type"],
        info["rows"],
        info["partitions"],
        info["build_seconds"],
    )
    return AnnIndexBuilt(gradients_version=info.pop("version"), info=info)


@task(name="tokenize_corpus", cache_policy=CACHE, **PERSIST, **IO_RETRIES)
def tokenize_corpus(
    index_uri: str, model: ModelConfig, data: DataConfig, data_fingerprint: str, shard_size: int
) -> Tokenized:
    """Read documents, split them into ≤ max_length-token examples, write the examples table (with the full-text
    index of its text that the bm25 and hybrid score modes search)."""
    # This docstring is part of the task's cache key (TASK_SOURCE): it changed when write_examples began to build
    # the full-text index, so an index tokenized before that is rewritten by its next index run, which adds one.
    start = time.perf_counter()
    docs = load_documents(data)
    tokenizer = load_tokenizer(model)
    examples = chunk_documents(docs, tokenizer, data.max_length, data.add_eos)
    texts = [tokenizer.decode(e.input_ids, skip_special_tokens=True) for e in examples]
    version = IndexStore(index_uri).write_examples(examples_table(examples, texts))
    n_tokens = int(sum(e.num_tokens for e in examples))
    get_run_logger().info(
        "tokenized %d documents into %d examples (%d tokens)", len(docs.texts), len(examples), n_tokens
    )
    return Tokenized(
        examples_version=version,
        examples=len(examples),
        documents=len(docs.texts),
        tokens=n_tokens,
        seconds=time.perf_counter() - start,
        shard_hashes=shard_hashes(examples, shard_size),
    )


def shard_hashes(examples: list[Example], shard_size: int) -> list[str]:
    """Content hash per gradient shard: a corpus that only grew re-logs only its changed tail."""
    out = []
    for lo in range(0, len(examples), shard_size):
        h = hashlib.sha256()
        for e in examples[lo : lo + shard_size]:
            h.update(f"{e.example_id}|{e.document_id}|{e.chunk_index}|{e.token_start}|".encode())
            if e.label_mask is not None:  # (only when set: the hashes of corpora without prompts stay as they were)
                h.update(b"mask" + _mask_key(e.label_mask))
            h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        out.append(h.hexdigest()[:20])
    return out


def _read_examples(store: IndexStore, examples_version: int, where: str) -> list[Example]:
    t = store.read_examples(
        columns=["example_id", "document_id", "chunk_index", "token_start", "token_end", "input_ids", "label_mask"],
        version=examples_version,
        where=where,
    ).to_pydict()
    return [
        Example(eid, doc, c, s, e, ids, label_mask=mask)
        for eid, doc, c, s, e, ids, mask in zip(
            t["example_id"],
            t["document_id"],
            t["chunk_index"],
            t["token_start"],
            t["token_end"],
            t["input_ids"],
            t["label_mask"],
        )
    ]


def projections_key(logging: LoggingConfig, model_fingerprint: str) -> str:
    key = f"projections-{logging.fingerprint()}-{model_fingerprint}"
    optimizer = optimizer_fingerprint(logging)  # the state file's content, not only its path
    return key if optimizer is None else f"{key}-{optimizer}"


@task(name="fit_projections", tags=["gpu"], **IO_RETRIES)
@on_compute_thread
def fit_projections(
    index_uri: str,
    model: ModelConfig,
    logging: LoggingConfig,
    model_fingerprint: str,
    examples_version: int,
    num_examples: int,
    progress: bool = True,
) -> FittedProjectionsResult | None:
    """Projections fitted to the model (KFAC-whitened with logging.precondition='kfac', corrected by the optimizer
    state with logging.optimizer_state), fitted once per index and model.

    Every stored gradient must share one projection, so a corpus that grows keeps the
    projections fitted when the index was created; --overwrite (or a new checkpoint) refits.
    """
    if not logging.fitted:
        return None
    store = IndexStore(index_uri)
    key = projections_key(logging, model_fingerprint)
    existing = store.read_artifact(key)
    if existing is not None:
        return _projections_result(key, FittedProjections.from_bytes(existing), 0.0, reused=True)
    lm, tokenizer = cached_model(model)
    ids = sample_indices(num_examples, logging.precondition_examples)  # example ids are 0..n-1
    examples = _read_examples(store, examples_version, f"example_id IN ({', '.join(map(str, ids))})")
    with MODEL_LOCK:
        start = time.perf_counter()
        fitted = fit_data_projections(lm, tokenizer, examples, logging, progress=progress)
        seconds = time.perf_counter() - start
    store.write_artifact(key, fitted.to_bytes())
    log = get_run_logger()
    if "examples" in fitted.meta:
        log.info(
            "fitted KFAC-whitened projections on %d examples (%d tokens) in %.1f s",
            fitted.meta["examples"],
            fitted.meta["tokens"],
            seconds,
        )
    if "optimizer" in fitted.meta:
        errors = fitted.meta["optimizer"]["factored_error"].values()
        log.info(
            "corrected by the optimizer state %s (step %d); factored vs exact 1/√v: %.3f mean relative error",
            fitted.meta["optimizer"]["file"],
            fitted.meta["optimizer"]["step"],
            sum(errors) / max(len(errors), 1),
        )
    return _projections_result(key, fitted, seconds, reused=False)


def _projections_result(key: str, fitted: FittedProjections, seconds: float, reused: bool) -> FittedProjectionsResult:
    return FittedProjectionsResult(
        artifact=key,
        digest=fitted.digest(),
        seconds=seconds,
        reused=reused,
        examples=int(fitted.meta.get("examples", 0)),
        tokens=int(fitted.meta.get("tokens", 0)),
        meta=fitted.meta,
    )


@task(
    name="log_gradients",
    cache_policy=CACHE - "examples_version" - "progress" - "new" - "previous",
    **PERSIST,
    tags=["gpu"],
    **IO_RETRIES,
    task_run_name="log_gradients-shard-{shard}",
)
def log_gradients(
    index_uri: str,
    model: ModelConfig,
    logging: LoggingConfig,
    model_fingerprint: str,
    examples_version: int,
    shard: int,
    shard_hash: str,
    progress: bool = True,
    projections: str | None = None,
    projections_digest: str | None = None,
    new: bool = False,
    previous: PreviousVersion | None = None,
) -> LoggedShard:
    """Projected per-example gradients of one shard of examples, written to the gradients table.

    Cached on the shard's content (shard_hash), not on the examples table version, so a
    re-tokenized corpus whose shard did not change is not logged again; and on the fitted
    projections' digest, so refitted projections re-log every shard. new=True (the flow saw no rows of the
    shard stored) writes it as one append with no lookup of old rows; a retry looks them up again, since
    the failed attempt may have committed its append.

    The write runs after MODEL_LOCK is released, so in a process that runs several of these tasks (the
    flow keeps the next shard waiting for the model) one shard's write overlaps the next shard's compute.

    previous (an incremental run): an example whose document has an example with the same tokens in that
    published version gets that example's stored gradient (and norm), copied at the cost of reading the few
    shards that hold it; only new or changed documents are computed.
    """
    store = IndexStore(index_uri)
    lo, hi = shard * logging.shard_size, (shard + 1) * logging.shard_size
    examples = _read_examples(store, examples_version, f"example_id >= {lo} AND example_id < {hi}")
    if not examples:
        raise ValueError(f"shard {shard} (example ids {lo}..{hi - 1}) is empty; the examples table has fewer rows")
    copied = None if previous is None else copy_unchanged(store, examples, previous, logging.shard_size)
    ids, rows, norms = ([part] for part in copied) if copied is not None else ([], [], [])
    done = set(ids[0].tolist()) if ids else set()
    examples_left = [e for e in examples if e.example_id not in done]

    def compute() -> tuple[Any, float]:  # on the compute thread, model loading included (it runs torch too)
        fitted = load_projections(store, projections)
        lm, tokenizer = cached_model(model)
        if not examples_left:
            return lm, 0.0
        with MODEL_LOCK:
            start = time.perf_counter()
            for batch_ids, grads in log_example_gradients(lm, tokenizer, examples_left, logging, progress, fitted):
                ids.append(batch_ids.numpy())
                rows.append(grads.numpy())
                norms.append(squared_norms(rows[-1]))
            return lm, time.perf_counter() - start

    lm, compute_seconds = COMPUTE.run(compute)
    first_attempt = task_run.run_count <= 1  # 0 when called outside a task run (.fn)
    start = time.perf_counter()
    store.write_gradient_shard(
        shard,
        np.concatenate(ids),
        np.concatenate(rows),
        logging.storage_dtype,
        new=new and first_attempt,
        sq_norms=np.concatenate(norms),
    )
    write_seconds = time.perf_counter() - start
    layout, full_params = describe_layout(lm, logging)
    return LoggedShard(
        shard=shard,
        examples=len(examples),
        tokens=sum(e.num_tokens for e in examples),
        compute_seconds=compute_seconds,
        write_seconds=write_seconds,
        worker=worker_id(),
        peak_memory_mb=peak_memory_mb(),
        layout=layout.to_json(),
        dim=layout.dim,
        full_gradient_params=full_params,
        reused=len(examples) - len(examples_left),
        computed_tokens=sum(e.num_tokens for e in examples_left),
        untracked_weights=untracked_weights(lm),
    )


@task(name="previous_version")
def previous_version(
    published: IndexManifest | None, overwrite: bool, model_fingerprint: str, projections: str | None
) -> PreviousVersion | None:
    """The published version whose stored gradients this run may copy for unchanged documents: only without
    overwrite, and only when they were logged by the same model weights with the same projections (the logging
    config is already held equal by IndexManifest.check_compatible)."""
    if published is None or overwrite:
        return None
    if published.model_fingerprint != model_fingerprint or published.projections_artifact != projections:
        return None
    return PreviousVersion(examples_version=published.examples_version, gradients_version=published.gradients_version)


def _mask_key(mask: list[bool] | None) -> bytes | None:
    """An example's label mask as bytes, one per token (None: every label counts): a reuse key and shard-hash input."""
    return None if mask is None else np.asarray(mask, dtype=np.uint8).tobytes()


def copy_unchanged(
    store: IndexStore, examples: list[Example], previous: PreviousVersion, shard_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(new example ids, vectors, sq_norms) for the examples whose document held an example with exactly the same
    tokens in the previous version, read from that version's gradients; None when there are none.

    A document's content fingerprint is its examples' tokens: an unchanged document (wherever it moved in the
    corpus) has every example matched; an edited one only the chunks before the edit; a new one none.
    """
    old = store.previous_examples(previous.examples_version, [e.document_id for e in examples]).to_pydict()
    before = {
        (doc, bytes(np.asarray(tokens, dtype=np.int32)), _mask_key(mask)): eid
        for eid, doc, tokens, mask in zip(
            old["example_id"], old.get("document_id", []), old.get("input_ids", []), old.get("label_mask", [])
        )
    }
    # The same tokens with another label mask (a prompt boundary moved) are another loss, so another gradient.
    pairs = [
        (e.example_id, before[key])
        for e in examples
        if (key := (e.document_id, bytes(np.asarray(e.input_ids, dtype=np.int32)), _mask_key(e.label_mask))) in before
    ]
    if not pairs:
        return None
    new_ids, old_ids = (np.asarray(c, dtype=np.int64) for c in zip(*pairs))
    old_shards = sorted({int(i) // shard_size for i in old_ids})
    _, vectors, sq_norms = store.read_gradient_rows(old_ids, previous.gradients_version, old_shards)
    return new_ids, vectors, sq_norms


def worker_id() -> str:
    """host:pid of this process: which worker of a Dask cluster or work pool ran a task."""
    return f"{socket.gethostname()}:{os.getpid()}"


@task(name="fit_curvature", cache_policy=CACHE, **PERSIST, **IO_RETRIES)
@on_compute_thread
def fit_curvature(
    index_uri: str,
    curvature: CurvatureConfig,
    layout: list[dict],
    gradients_version: int,
    batch_size: int = 4096,
) -> FittedCurvature:
    """Stream the gradients table into the block-diagonal Fisher and store its eigendecomposition, then (a
    second pass) each example's ‖(F+λI)^-1/2 g_i‖ for the configured damping, which relatif and cosine divide by.
    The identity on a float32 index reads neither: its norms ‖g_i‖ are the logged sq_norm column's.
    """
    store = IndexStore(index_uri)
    start = time.perf_counter()
    # The identity fits nothing: its count and norms ‖g_i‖ come from the logged sq_norm column, not a scan of the
    # vectors (two scans of the whole table otherwise, about what logging the gradients took on a small model).
    norms = logged_norms(store, gradients_version) if curvature.kind == "identity" else None
    if norms is not None:
        curv = Curvature(
            Layout.from_json(layout), "identity", {}, int(np.count_nonzero(~np.isnan(norms))), curvature.damping_factor
        )
    else:

        def batches():  # one scan per pass (two for ekfac)
            return (vectors for _ids, vectors in gradient_batches(store, batch_size, gradients_version))

        curv = fit_fisher(Layout.from_json(layout), curvature, batches)
        norms = compute_norms(store, curv, gradients_version, batch_size)
    key = f"curvature-{curvature.fingerprint()}-v{gradients_version}"
    store.write_artifact(key, curv.to_bytes())
    store_norms(store, norms_key(key, curv), norms)
    return FittedCurvature(
        artifact=key,
        examples=curv.count,
        summary=json.dumps(curv.summary()),
        seconds=time.perf_counter() - start,
    )


@task(name="assemble_manifest")
def assemble_manifest(
    config: IndexConfig,
    tokenized: Tokenized,
    shards: list[LoggedShard],
    gradients_version: int,
    curvature: FittedCurvature,
    model_fingerprint: str,
    projections: FittedProjectionsResult | None = None,
    mlflow_run_id: str | None = None,
    previous: IndexManifest | None = None,
    ann: AnnIndexBuilt | None = None,
) -> IndexManifest:
    """The manifest of what the stages built, the gradients logged by the model of `model_fingerprint` (the one the
    run logged them with, `dataworth.fingerprint.index_model_fingerprint`); a calibration of `previous` is kept
    while still valid."""
    return IndexManifest(
        config=IndexBuildConfig.of(config),
        model_fingerprint=model_fingerprint,
        data_fingerprint=data_fingerprint(config.data),
        layout=shards[0].layout,
        dim=shards[0].dim,
        full_gradient_params=shards[0].full_gradient_params,
        num_examples=tokenized.examples,
        num_documents=tokenized.documents,
        num_tokens=tokenized.tokens,
        examples_version=tokenized.examples_version,
        gradients_version=gradients_version,
        curvature_artifact=curvature.artifact,
        projections_artifact=projections.artifact if projections else None,
        mlflow_run_id=mlflow_run_id,
        calibration=previous.calibration_for(config) if previous else None,
        ann_index=ann.info if ann else None,
    )


@task(name="publish_index", **IO_RETRIES)
def publish_index(index_uri: str, manifest: IndexManifest, keep_versions_days: float | None = None) -> Published:
    """Write the manifest last: only then does the index exist for queries. Then remove table versions older
    than keep_versions_days (those of earlier builds, which no query reads any more)."""
    store = IndexStore(index_uri)
    try:
        store.check_gradient_ids(manifest.num_examples, manifest.gradients_version)
    except IndexStoreError as exc:
        raise ValueError(
            f"index {index_uri!r}: {exc}; a shard was lost (a writer killed between deleting and re-adding its "
            "rows, a concurrent table creation) or doubled (two writers of one shard). Re-run the index flow: "
            "missing shards are logged again; overwrite=True rebuilds the index"
        ) from None
    # A new publication, never a re-stamp of an earlier one: published_at tells scoring runs apart.
    store.publish_manifest(manifest.model_copy(update={"published_at": None}))
    if keep_versions_days is not None:
        store.cleanup_versions(timedelta(days=keep_versions_days))
    return Published(index_uri=index_uri, manifest=store.read_manifest(), bytes_stored=store.bytes_stored())
