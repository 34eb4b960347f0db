"""Index task bodies (`.fn`) against a temporary LanceDB directory."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dataworth.attribution.curvature import Curvature
from dataworth.fingerprint import model_fingerprint
from storage import IndexStore, IndexStoreError
from tasks.common import norms_key, read_norms
from tasks.index import (
    Published,
    fit_curvature,
    fit_projections,
    index_state,
    log_gradients,
    prune_index,
    publish_index,
)


def test_tokenize_corpus_writes_examples_and_reports_counts(stages, index_config, texts):
    cfg = index_config(precondition="none")
    tok = stages.tokenize(cfg)
    store = IndexStore(cfg.index_uri)
    assert tok.documents == len(texts) and tok.examples == store.num_examples() > len(texts)  # chunked
    assert tok.examples_version == store.examples_version()
    assert len(tok.shard_hashes) == math.ceil(tok.examples / cfg.logging.shard_size)
    rows = store.read_examples(columns=["example_id", "num_tokens", "input_ids"]).to_pylist()
    assert [r["example_id"] for r in rows] == list(range(tok.examples))
    assert tok.tokens == sum(r["num_tokens"] for r in rows) == sum(len(r["input_ids"]) for r in rows)
    metrics = tok.metrics()
    assert (metrics["documents"], metrics["examples"], metrics["tokens"]) == (tok.documents, tok.examples, tok.tokens)
    assert metrics["tokenize_seconds"] > 0
    assert stages.tokenize(cfg).shard_hashes == tok.shard_hashes  # content hashes are stable


def test_log_gradients_writes_each_shard_once(stages, index_config):
    cfg = index_config(precondition="none")
    tok = stages.tokenize(cfg)
    shards = stages.log_all(cfg, tok)
    store = IndexStore(cfg.index_uri)
    assert store.num_gradients() == tok.examples and store.shards_present() == set(range(len(shards)))
    assert sum(s.examples for s in shards) == tok.examples and sum(s.tokens for s in shards) == tok.tokens
    assert shards[0].dim == store.gradient_dim() == sum(b["k_in"] * b["k_out"] for b in shards[0].layout)
    assert shards[0].full_gradient_params > shards[0].dim
    assert {"log_tokens_per_s", "log_examples_per_s", "peak_memory_mb", "examples_reused"} == set(shards[0].metrics())
    stages.log_all(cfg, tok)  # a retried shard is stored once
    assert store.num_gradients() == tok.examples
    with pytest.raises(ValueError, match="is empty"):
        log_gradients.fn(
            cfg.index_uri, cfg.model, cfg.logging, "mfp", tok.examples_version, len(shards) + 1, "h", progress=False
        )


def test_fit_projections_once_then_reused(stages, index_config):
    cfg = index_config(precondition="kfac", precondition_examples=4)
    tok = stages.tokenize(cfg)
    mfp = model_fingerprint(cfg.model)
    args = (cfg.index_uri, cfg.model, cfg.logging, mfp, tok.examples_version, tok.examples)
    fitted = fit_projections.fn(*args, progress=False)
    assert not fitted.reused and fitted.examples == 4 and fitted.tokens > 0
    assert set(fitted.metrics()) == {"precondition_seconds", "precondition_tokens"}
    again = fit_projections.fn(*args, progress=False)
    assert again.reused and again.digest == fitted.digest and again.artifact == fitted.artifact
    shards = stages.log_all(cfg, tok, projections=fitted.artifact, projections_digest=fitted.digest)
    assert IndexStore(cfg.index_uri).num_gradients() == sum(s.examples for s in shards)
    plain = cfg.logging.model_copy(update={"precondition": "none"})
    assert fit_projections.fn(cfg.index_uri, cfg.model, plain, mfp, tok.examples_version, tok.examples) is None


def test_fit_curvature_stores_the_fisher(stages, index_config):
    cfg = index_config(precondition="none")
    _, shards, curv, manifest = stages.build(cfg)
    store = IndexStore(cfg.index_uri)
    fitted = Curvature.from_bytes(store.read_artifact(curv.artifact))
    assert curv.examples == fitted.count == manifest.num_examples
    assert json.loads(curv.summary) == fitted.summary()
    assert set(curv.metrics()) == {"curvature_seconds"}


def test_fit_curvature_stores_every_examples_whitened_norm(stages, index_config):
    """n_i = sqrt(g_i^T (F+λI)^-1 g_i) per example id, for the index's damping, next to the curvature."""
    cfg = index_config(precondition="none")
    _, _, curv, manifest = stages.build(cfg)
    store = IndexStore(cfg.index_uri)
    fitted = Curvature.from_bytes(store.read_artifact(curv.artifact))
    norms = read_norms(store, norms_key(curv.artifact, fitted))
    assert norms.shape == (manifest.num_examples,) and norms.dtype == np.float64
    ids, vectors, _ = zip(*store.iter_gradients(5))
    G = torch.tensor(np.concatenate(vectors), dtype=torch.float64)
    inverse = torch.linalg.inv(fitted.matrix(1.0))
    explicit = torch.sqrt(torch.einsum("nd,de,ne->n", G, inverse, G)).numpy()
    assert np.allclose(norms[np.concatenate(ids)], explicit, rtol=1e-6)
    assert norms_key(curv.artifact, fitted.with_damping(0.5)) != norms_key(curv.artifact, fitted)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_identity_curvature_norms_are_the_stored_vectors_norms(stages, index_config, dtype, monkeypatch):
    """The identity fits nothing: with float32 vectors its count and ‖g_i‖ come from the logged sq_norm column
    without a scan of the vectors; with another storage dtype from the decoded vectors (their own norms)."""
    import tasks.index as index_tasks

    cfg = index_config(precondition="none", storage_dtype=dtype)
    cfg = cfg.model_copy(update={"curvature": cfg.curvature.model_copy(update={"kind": "identity"})})
    tok = stages.tokenize(cfg)
    shards = stages.log_all(cfg, tok)
    store = IndexStore(cfg.index_uri)
    scans = []
    real = index_tasks.gradient_batches
    monkeypatch.setattr(index_tasks, "gradient_batches", lambda *a, **k: scans.append(1) or real(*a, **k))
    real_norms = index_tasks.compute_norms
    monkeypatch.setattr(index_tasks, "compute_norms", lambda *a, **k: scans.append(2) or real_norms(*a, **k))
    curv = fit_curvature.fn(cfg.index_uri, cfg.curvature, shards[0].layout, store.gradients_version())
    assert bool(scans) == (dtype != "float32")
    fitted = Curvature.from_bytes(store.read_artifact(curv.artifact))
    assert fitted.kind == "identity" and curv.examples == tok.examples
    norms = read_norms(store, norms_key(curv.artifact, fitted))
    ids, vectors, _ = zip(*store.iter_gradients(5))
    explicit = np.linalg.norm(np.concatenate(vectors).astype(np.float64), axis=1)
    assert norms.shape == (tok.examples,) and np.allclose(norms[np.concatenate(ids)], explicit, rtol=1e-6)


def test_publish_index_makes_the_index_visible(stages, index_config):
    cfg = index_config(precondition="none")
    _, _, _, manifest = stages.build(cfg)
    store = IndexStore(cfg.index_uri)
    assert index_state.fn(cfg.index_uri).manifest is None
    published = publish_index.fn(cfg.index_uri, manifest)
    assert isinstance(published, Published)
    assert published.manifest == store.read_manifest() and published.manifest.published_at is not None
    assert published.bytes_stored == store.bytes_stored() > 0
    metrics = published.metrics()
    assert metrics["gradient_dim"] == manifest.dim and metrics["indexed_examples"] == manifest.num_examples
    assert metrics["compression_ratio"] == manifest.full_gradient_params / manifest.dim
    state = index_state.fn(cfg.index_uri)
    assert state.manifest == published.manifest and state.num_gradients == manifest.num_examples

    prune_index.fn(cfg.index_uri, keep_shards=1)  # a shard lost: publishing now would serve a partial index
    lost = manifest.model_copy(update={"gradients_version": store.gradients_version()})
    with pytest.raises(ValueError, match="a shard was lost"):
        publish_index.fn(cfg.index_uri, lost)
    dropped = prune_index.fn(cfg.index_uri, drop_all=True)
    assert dropped.manifest is None and not dropped.has_examples and dropped.shards == []


def test_log_gradients_trusts_new_only_on_a_first_attempt(stages, index_config, monkeypatch):
    # The flow passes new=True for a shard it saw absent; a retry may follow an attempt whose append
    # committed, so it looks the shard's rows up again instead of appending a second copy.
    import tasks.index

    cfg = index_config(precondition="none")
    tok = stages.tokenize(cfg)
    shards = stages.log_all(cfg, tok)
    store = IndexStore(cfg.index_uri)
    args = (cfg.index_uri, cfg.model, cfg.logging, "mfp", tok.examples_version, 0, tok.shard_hashes[0])
    monkeypatch.setattr(tasks.index, "task_run", SimpleNamespace(run_count=2))
    log_gradients.fn(*args, progress=False, new=True)
    store.check_gradient_ids(tok.examples)  # the retry rewrote shard 0 once
    monkeypatch.setattr(tasks.index, "task_run", SimpleNamespace(run_count=1))
    log_gradients.fn(*args, progress=False, new=True)  # a first attempt trusts the hint: one append
    with pytest.raises(IndexStoreError, match="more than once"):
        store.check_gradient_ids(tok.examples)
    assert len(shards) >= 1


def test_model_lock_pickles_as_the_receiving_process_lock():
    # Dask ships task functions (globals included) by pickling; the lock must arrive as the worker's own.
    import pickle

    import cloudpickle

    from tasks.common import MODEL_LOCK

    assert pickle.loads(pickle.dumps(MODEL_LOCK)) is MODEL_LOCK
    shipped = pickle.loads(cloudpickle.dumps(log_gradients.fn))
    assert shipped.__globals__["MODEL_LOCK"] is MODEL_LOCK
    with MODEL_LOCK:
        assert not MODEL_LOCK._lock.acquire(blocking=False)  # held: the process's model work is serialized
