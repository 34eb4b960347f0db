"""The `index` flow: tokenize → log gradients (one task per shard) → fit curvature → publish."""

from __future__ import annotations

import math
import os
import time

from prefect import flow, get_run_logger

from dataworth.config import IndexConfig
from dataworth.fingerprint import data_fingerprint, index_model_fingerprint
from dataworth.model import check_model_source
from flows.runner import in_window, model_processes
from flows.shards import ShardJob, log_on_pool
from storage import IndexStore
from tasks.index import (
    assemble_manifest,
    build_ann_index,
    fit_curvature,
    fit_projections,
    index_state,
    log_gradients,
    previous_version,
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
    check_model_source(config.model.name_or_path)  # a missing model, said before any other work
    try:
        state = index_state(config.index_uri)
    except Exception:  # a damaged index: only an overwrite can replace it
        if not config.overwrite:
            raise
        log.warning("the index at %s cannot be read; --overwrite replaces it whole", config.index_uri)
        state = prune_index(config.index_uri, drop_all=True)
    if state.manifest is not None:
        state.manifest.check_compatible(config)
    fresh = config.overwrite or not state.has_examples
    if config.overwrite and state.manifest is not None:
        # Rebuilt beside the published version: queries read the versions its manifest pins until the new
        # manifest is published, then the new ones; never "no index".
        state = prune_index(config.index_uri, reset=True)
    elif config.overwrite and state.has_examples:  # an unpublished build: nobody reads it
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
        recorded = state.manifest.model_fingerprint if state.manifest is not None and not config.overwrite else None
        mfp = index_model_fingerprint(config.model, recorded)
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
        previous = previous_version(state.manifest, config.overwrite, mfp, proj.artifact if proj else None)
        if previous is not None:  # incremental: unchanged documents' gradients are copied, not computed
            proj_args["previous"] = previous

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
        logging_started = time.perf_counter()
        if config.runner.kind == "pool":  # ranges of shards as flow runs on the work pool's workers
            jobs = [
                ShardJob(shard=s, shard_hash=h, new=s not in present, refresh=fresh or s not in present)
                for s, h in enumerate(tok.shard_hashes)
            ]
            common = dict(index_uri=uri, model=config.model, logging=config.logging, model_fingerprint=mfp)
            common.update(examples_version=tok.examples_version, progress=progress, **proj_args)
            logged = {}
            for part in (jobs[:1], jobs[1:]):
                for s, shard in log_on_pool(config.runner, part, common):
                    run.log(shard, stage="log_gradients", step=s)
                    logged[s] = shard
        else:

            def logged_shard(s: int, future):
                shard = run.log_result("log_gradients", future, step=s)
                return shard.as_cached() if future.state.name == "Cached" else shard

            logged = {0: logged_shard(0, submit(0))}
            # Per process, three shards in flight: one computing, one waiting for the model (its compute starts the
            # moment the previous one's ends) and one writing (outside MODEL_LOCK). A task holds only its own shard's
            # examples and gradients, so memory does not grow with the corpus; a full window of unwritten shards is
            # the only thing that makes compute wait for a write.
            for s, future in in_window(submit, range(1, n_shards), 3 * model_processes()):
                logged[s] = logged_shard(s, future)
        shards = [logged[s] for s in range(n_shards)]
        for s in shards:
            run.metrics({"log_compute_seconds": s.compute_seconds, "log_write_seconds": s.write_seconds}, step=s.shard)
        workers = len({s.worker for s in shards})
        reused, computed = sum(s.reused for s in shards), sum(s.computed for s in shards)
        run.metrics(
            {
                "log_workers": workers,
                "log_wall_seconds": time.perf_counter() - logging_started,
                "examples_reused": reused,
                "examples_computed": computed,
            }
        )
        # A corpus that shrank leaves shards past the new end behind: they must not be scored.
        after = prune_index(uri, keep_shards=n_shards)
        version, ann = after.gradients_version, None
        if config.ann.build:  # after compaction: its table version is the one curvature and the manifest record
            ann = run.log_result("build_ann_index", build_ann_index(uri, config.ann, return_state=True))
            version = ann.gradients_version
        # Table versions restart after a drop, so after an overwrite a cached curvature could be stale.
        curv = run.log_result(
            "fit_curvature",
            fit_curvature.with_options(refresh_cache=fresh)(
                uri, config.curvature, shards[0].layout, version, return_state=True
            ),
        )
        manifest = assemble_manifest(config, tok, shards, version, curv, mfp, proj, run.run_id, state.manifest, ann)
        published = run.log_result(
            "publish_index", publish_index(uri, manifest, config.keep_versions_days, return_state=True)
        )
        run.artifact_text("manifest.json", published.manifest.model_dump_json(indent=2))

    tokens = sum(s.tokens_computed for s in shards)
    seconds = sum(s.compute_seconds for s in shards)
    untracked = shards[0].untracked_weights
    if untracked:
        names = list(untracked)
        log.warning(
            "%d weights in %d tensors of the model are in no Linear/Conv1D layer, so in no gradient and no score "
            "(e.g. %s): fused mixture-of-experts weights or convolutions are not tracked",
            sum(untracked.values()),
            len(names),
            ", ".join(names[:3]) + (" …" if len(names) > 3 else ""),
        )
    summary = {
        "index_uri": uri,
        "examples": tok.examples,
        "documents": tok.documents,
        "shards": n_shards,
        "log_workers": workers,
        "examples_reused": reused,
        "examples_computed": computed,
        "index_version": manifest.gradients_version,
        "dim": manifest.dim,
        "compression_ratio": published.compression_ratio,
        "bytes_stored": published.bytes_stored,
        "tracked_params": published.manifest.full_gradient_params,
        "untracked_params": sum(untracked.values()),
        "untracked_tensors": list(untracked),
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
