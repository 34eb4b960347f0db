"""Index stages: tokenize → log gradients (per shard) → fit curvature → publish."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow as pa
import torch
from prefect import get_run_logger, task

from dataworth.attribution.curvature import FisherAccumulator
from dataworth.attribution.gradients import log_example_gradients
from dataworth.attribution.kfac import fit_kfac_projections, sample_indices
from dataworth.attribution.projection import FittedProjections, Layout, describe_layout
from dataworth.config import CurvatureConfig, DataConfig, LoggingConfig, ModelConfig
from dataworth.data import Example, chunk_documents, load_documents
from dataworth.model import load_tokenizer
from storage import IndexStore
from storage.schemas import SCHEMA_VERSION

from .common import CACHE, IO_RETRIES, MODEL_LOCK, cached_model
from .tracking import Tracker


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@task(name="index_state", **IO_RETRIES)
def index_state(index_uri: str) -> dict:
    """What an index holds now: its manifest (if published), tables and gradient shards."""
    return IndexStore(index_uri).state()


@task(name="prune_index", **IO_RETRIES)
def prune_index(index_uri: str, drop_all: bool = False, keep_shards: int | None = None) -> dict:
    """Drop the whole index (overwrite), or gradient shards numbered keep_shards and above."""
    store = IndexStore(index_uri)
    if drop_all:
        store.drop()
    elif keep_shards is not None:
        store.delete_shards_from(keep_shards)
    return store.state()


@task(name="tokenize_corpus", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def tokenize_corpus(
    index_uri: str,
    model: ModelConfig,
    data: DataConfig,
    data_fingerprint: str,
    shard_size: int,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """Read documents, split them into ≤ max_length-token examples, write the examples table."""
    start = time.perf_counter()
    docs = load_documents(data)
    tokenizer = load_tokenizer(model)
    examples = chunk_documents(docs, tokenizer, data.max_length, data.add_eos)
    table = pa.table(
        {
            "example_id": pa.array([e.example_id for e in examples], pa.int64()),
            "document_id": [e.document_id for e in examples],
            "chunk_index": pa.array([e.chunk_index for e in examples], pa.int32()),
            "token_start": pa.array([e.token_start for e in examples], pa.int32()),
            "token_end": pa.array([e.token_end for e in examples], pa.int32()),
            "num_tokens": pa.array([e.num_tokens for e in examples], pa.int32()),
            "text": [tokenizer.decode(e.input_ids, skip_special_tokens=True) for e in examples],
            "source": [e.source or None for e in examples],
            "input_ids": pa.array([e.input_ids for e in examples], pa.list_(pa.int32())),
        }
    )
    version = IndexStore(index_uri).write_examples(table)
    n_tokens = int(sum(e.num_tokens for e in examples))
    seconds = time.perf_counter() - start
    Tracker.attach(tracking_uri, run_id).metrics(
        {"documents": len(docs.texts), "examples": len(examples), "tokens": n_tokens, "tokenize_seconds": seconds}
    )
    get_run_logger().info(
        "tokenized %d documents into %d examples (%d tokens)", len(docs.texts), len(examples), n_tokens
    )
    return {
        "examples_version": version,
        "examples": len(examples),
        "documents": len(docs.texts),
        "tokens": n_tokens,
        "shard_hashes": shard_hashes(examples, shard_size),
    }


def shard_hashes(examples: list[Example], shard_size: int) -> list[str]:
    """Content hash per gradient shard: a corpus that only grew re-logs only its changed tail."""
    out = []
    for lo in range(0, len(examples), shard_size):
        h = hashlib.sha256()
        for e in examples[lo : lo + shard_size]:
            h.update(f"{e.example_id}|{e.document_id}|{e.chunk_index}|{e.token_start}|".encode())
            h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        out.append(h.hexdigest()[:20])
    return out


def _read_examples(store: IndexStore, examples_version: int, where: str) -> list[Example]:
    t = store.read_examples(
        columns=["example_id", "document_id", "chunk_index", "token_start", "token_end", "input_ids"],
        version=examples_version,
        where=where,
    ).to_pydict()
    return [
        Example(eid, doc, c, s, e, ids)
        for eid, doc, c, s, e, ids in zip(
            t["example_id"], t["document_id"], t["chunk_index"], t["token_start"], t["token_end"], t["input_ids"]
        )
    ]


def projections_key(logging: LoggingConfig, model_fingerprint: str) -> str:
    return f"projections-{logging.fingerprint()}-{model_fingerprint}"


def load_projections(store: IndexStore, key: str | None) -> FittedProjections | None:
    if key is None:
        return None
    blob = store.read_artifact(key)
    if blob is None:
        raise ValueError(
            f"index {store.uri!r} lists fitted projections {key!r} but they are missing; "
            "rebuild the index (dataworth index ... --overwrite)"
        )
    return FittedProjections.from_bytes(blob)


@task(name="fit_projections", tags=["gpu"], **IO_RETRIES)
def fit_projections(
    index_uri: str,
    model: ModelConfig,
    logging: LoggingConfig,
    model_fingerprint: str,
    examples_version: int,
    num_examples: int,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    progress: bool = True,
) -> dict | None:
    """KFAC-whitened projections (logging.precondition='kfac'), fitted once per index and model.

    Every stored gradient must share one projection, so a corpus that grows keeps the
    projections fitted when the index was created; --overwrite (or a new checkpoint) refits.
    """
    if logging.precondition == "none":
        return None
    store = IndexStore(index_uri)
    key = projections_key(logging, model_fingerprint)
    existing = store.read_artifact(key)
    if existing is not None:
        fitted = FittedProjections.from_bytes(existing)
        return {"artifact": key, "digest": fitted.digest(), "seconds": 0.0, "reused": True, **fitted.meta}
    lm, tokenizer = cached_model(model)
    ids = sample_indices(num_examples, logging.precondition_examples)  # example ids are 0..n-1
    examples = _read_examples(store, examples_version, f"example_id IN ({', '.join(map(str, ids))})")
    with MODEL_LOCK:
        start = time.perf_counter()
        fitted = fit_kfac_projections(lm, tokenizer, examples, logging, progress=progress)
        seconds = time.perf_counter() - start
    store.write_artifact(key, fitted.to_bytes())
    Tracker.attach(tracking_uri, run_id).metrics(
        {"precondition_seconds": seconds, "precondition_tokens": fitted.meta["tokens"]}
    )
    get_run_logger().info(
        "fitted KFAC-whitened projections on %d examples (%d tokens) in %.1f s",
        fitted.meta["examples"],
        fitted.meta["tokens"],
        seconds,
    )
    return {"artifact": key, "digest": fitted.digest(), "seconds": seconds, "reused": False, **fitted.meta}


@task(
    name="log_gradients",
    cache_policy=CACHE - "examples_version" - "progress",
    persist_result=True,
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
    run_id: str | None = None,
    tracking_uri: str | None = None,
    progress: bool = True,
    projections: str | None = None,
    projections_digest: str | None = None,
) -> dict:
    """Projected per-example gradients of one shard of examples, written to the gradients table.

    Cached on the shard's content (shard_hash), not on the examples table version, so a
    re-tokenized corpus whose shard did not change is not logged again; and on the fitted
    projections' digest, so refitted projections re-log every shard.
    """
    store = IndexStore(index_uri)
    lo, hi = shard * logging.shard_size, (shard + 1) * logging.shard_size
    examples = _read_examples(store, examples_version, f"example_id >= {lo} AND example_id < {hi}")
    if not examples:
        raise ValueError(f"shard {shard} (example ids {lo}..{hi - 1}) is empty; the examples table has fewer rows")
    fitted = load_projections(store, projections)
    lm, tokenizer = cached_model(model)
    ids, rows = [], []
    with MODEL_LOCK:
        start = time.perf_counter()
        for batch_ids, grads in log_example_gradients(lm, tokenizer, examples, logging, progress, fitted):
            ids.append(batch_ids)
            rows.append(grads)
        seconds = time.perf_counter() - start
    ids_np = torch.cat(ids).numpy()
    vectors = torch.cat(rows).numpy()
    store.write_gradient_shard(shard, ids_np, vectors, logging.storage_dtype)
    tokens = sum(e.num_tokens for e in examples)
    layout, full_params = describe_layout(lm, logging)
    stats = {
        "shard": shard,
        "examples": len(examples),
        "tokens": tokens,
        "seconds": seconds,
        "layout": layout.to_json(),
        "dim": layout.dim,
        "full_gradient_params": full_params,
    }
    Tracker.attach(tracking_uri, run_id).metrics(
        {
            "log_tokens_per_s": tokens / seconds,
            "log_examples_per_s": len(examples) / seconds,
            "peak_memory_mb": _peak_memory_mb(),
        },
        step=shard,
    )
    return stats


@task(name="fit_curvature", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def fit_curvature(
    index_uri: str,
    curvature: CurvatureConfig,
    layout: list[dict],
    gradients_version: int,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    batch_size: int = 4096,
) -> dict:
    """Stream the gradients table into the block-diagonal Fisher and store its eigendecomposition."""
    store = IndexStore(index_uri)
    start = time.perf_counter()
    acc = FisherAccumulator(Layout.from_json(layout), curvature)
    for _ids, vectors, _sq in store.iter_gradients(batch_size, version=gradients_version):
        acc.update(torch.tensor(vectors))
    curv = acc.finalize()
    key = f"curvature-{curvature.fingerprint()}-v{gradients_version}"
    store.write_artifact(key, curv.to_bytes())
    summary = curv.summary()
    Tracker.attach(tracking_uri, run_id).metrics({"curvature_seconds": time.perf_counter() - start})
    return {
        "artifact": key,
        "examples": acc.count,
        "summary": json.dumps(summary),
        "seconds": time.perf_counter() - start,
    }


@task(name="publish_index", **IO_RETRIES)
def publish_index(index_uri: str, manifest: dict, run_id: str | None = None, tracking_uri: str | None = None) -> dict:
    """Write the manifest last: only then does the index exist for queries."""
    store = IndexStore(index_uri)
    stored_rows = store.num_gradients(manifest["gradients_version"])
    if stored_rows != manifest["num_examples"]:
        raise ValueError(
            f"index {index_uri!r} holds {stored_rows} gradients for {manifest['num_examples']} examples; a shard was "
            "lost (e.g. to a concurrent table creation). Re-run the index flow: missing shards are logged again"
        )
    manifest = {**manifest, "schema_version": SCHEMA_VERSION, "published_at": time.time()}
    store.publish_manifest(manifest)
    stored = store.bytes_stored()
    n, dim = manifest["num_examples"], manifest["dim"]
    Tracker.attach(tracking_uri, run_id).metrics(
        {
            "bytes_stored": stored,
            "gradient_dim": dim,
            "compression_ratio": manifest["full_gradient_params"] / max(dim, 1),
            "indexed_examples": n,
        }
    )
    return {"index_uri": index_uri, "bytes_stored": stored, "gradients_version": manifest["gradients_version"]}
