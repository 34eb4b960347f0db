"""The `index` flow: tokenize → log gradients (one task per shard) → fit curvature → publish."""

from __future__ import annotations

import math
import os
import time

from prefect import flow, get_run_logger

from dataworth.config import IndexConfig
from dataworth.fingerprint import data_fingerprint, model_fingerprint
from storage import IndexStore
from tasks.index import (
    assemble_manifest,
    fit_curvature,
    fit_projections,
    index_state,
    log_gradients,
    prune_index,
    publish_index,
    tokenize_corpus,
)
from tasks.tracking import tracked_run


def config_path(index_uri: str) -> str | None:
    """Where the index's resolved config is saved: inside a local index directory, else only in MLflow."""
    local = IndexStore(index_uri).local_path
    return None if local is None else os.path.join(local, "index_config.yaml")


@flow(name="index", log_prints=True)
def index_flow(config: IndexConfig, progress: bool = True) -> dict:
    """Build (or bring up to date) an attribution index over a corpus."""
    log = get_run_logger()
    started = time.perf_counter()
    state = index_state(config.index_uri)
    if state.manifest is not None:
        state.manifest.check_compatible(config)
    fresh = config.overwrite or not state.has_examples
    if config.overwrite and (state.manifest or state.has_examples):
        state = prune_index(config.index_uri, drop_all=True)

    uri = config.index_uri
    with tracked_run(config.tracking, "index", config, config_path=config_path(uri)) as run:
        tok = run.log_result(
            "tokenize_corpus",
            tokenize_corpus.with_options(refresh_cache=fresh)(
                uri,
                config.model,
                config.data,
                data_fingerprint(config.data),
                config.logging.shard_size,
                return_state=True,
            ),
        )
        n_shards = math.ceil(tok.examples / config.logging.shard_size)
        mfp = model_fingerprint(config.model)
        present = set(state.shards)
        proj = run.log_result(
            "fit_projections",
            fit_projections(
                uri,
                config.model,
                config.logging,
                mfp,
                tok.examples_version,
                tok.examples,
                progress=progress,
                return_state=True,
            ),
        )
        proj_args = {"projections": proj.artifact, "projections_digest": proj.digest} if proj else {}

        def submit(s: int):
            return log_gradients.with_options(refresh_cache=fresh or s not in present).submit(
                uri,
                config.model,
                config.logging,
                mfp,
                tok.examples_version,
                s,
                tok.shard_hashes[s],
                progress=progress,
                new=s not in present,
                **proj_args,
            )

        # Shard 0 alone first: it creates the gradients table, which concurrent creators could clobber.
        first = run.log_result("log_gradients", submit(0), step=0)
        futures = {s: submit(s) for s in range(1, n_shards)}
        shards = [first] + [run.log_result("log_gradients", f, step=s) for s, f in futures.items()]
        # A corpus that shrank leaves shards past the new end behind: they must not be scored.
        after = prune_index(uri, keep_shards=n_shards)
        # Table versions restart after a drop, so after an overwrite a cached curvature could be stale.
        curv = run.log_result(
            "fit_curvature",
            fit_curvature.with_options(refresh_cache=fresh)(
                uri, config.curvature, shards[0].layout, after.gradients_version, return_state=True
            ),
        )
        manifest = assemble_manifest(
            config, tok, shards, after.gradients_version, curv, proj, run.run_id, state.manifest
        )
        published = run.log_result("publish_index", publish_index(uri, manifest, return_state=True))
        run.artifact_text("manifest.json", published.manifest.model_dump_json(indent=2))

    tokens = sum(s.tokens for s in shards)
    seconds = sum(s.seconds for s in shards)
    summary = {
        "index_uri": uri,
        "examples": tok.examples,
        "documents": tok.documents,
        "shards": n_shards,
        "dim": manifest.dim,
        "compression_ratio": published.compression_ratio,
        "bytes_stored": published.bytes_stored,
        "tokens_per_s": tokens / seconds if seconds else None,
        "mlflow_run_id": run.run_id,
        "tracking_uri": run.uri,
        "seconds": time.perf_counter() - started,
        "compute_seconds": seconds + curv.seconds + (proj.seconds if proj else 0.0),
    }
    log.info(
        "index ready at %s: %d examples, %d-dim gradients (%.0f× compression)",
        uri,
        tok.examples,
        manifest.dim,
        summary["compression_ratio"],
    )
    return summary
