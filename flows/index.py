"""The `index` flow: tokenize → log gradients (one task per shard) → fit curvature → publish."""

from __future__ import annotations

import json
import math
import time

from prefect import flow, get_run_logger

from dataworth.config import IndexConfig
from dataworth.fingerprint import data_fingerprint, model_fingerprint
from tasks.index import (
    fit_curvature,
    fit_projections,
    index_state,
    log_gradients,
    prune_index,
    publish_index,
    tokenize_corpus,
)
from tasks.tracking import Tracker

# What the stored gradients depend on; the curvature may change without a rebuild.
GRADIENT_KEYS = ("model", "data", "logging")


def _check_compatible(config: IndexConfig, manifest: dict | None) -> None:
    if manifest is None or config.overwrite:
        return
    old, new = manifest["config"], config.model_dump(mode="json")
    changed = [k for k in GRADIENT_KEYS if old.get(k) != new[k]]
    if changed:
        diffs = "; ".join(
            f"{k}.{f}: {old[k].get(f)!r} → {new[k][f]!r}" for k in changed for f in new[k] if old[k].get(f) != new[k][f]
        )
        raise ValueError(
            f"index {config.index_uri!r} was built with a different config ({diffs}). Pass overwrite=True "
            "(--overwrite) to rebuild it, or choose another index_uri"
        )


def _kept_calibration(manifest: dict | None, config: IndexConfig) -> dict | None:
    if not manifest or not manifest.get("calibration") or config.overwrite:
        return None
    same = all(manifest["config"].get(k) == config.model_dump(mode="json")[k] for k in (*GRADIENT_KEYS, "curvature"))
    return manifest["calibration"] if same else None


@flow(name="index", log_prints=True)
def index_flow(config: IndexConfig, progress: bool = True) -> dict:
    """Build (or bring up to date) an attribution index over a corpus."""
    log = get_run_logger()
    started = time.perf_counter()
    state = index_state(config.index_uri)
    _check_compatible(config, state["manifest"])
    fresh = config.overwrite or not state["has_examples"]
    if config.overwrite and (state["manifest"] or state["has_examples"]):
        state = prune_index(config.index_uri, drop_all=True)

    tracker = Tracker(config.tracking)
    run_id = tracker.start("index", config.model_dump(mode="json"), {"dataworth.flow": "index"})
    common = tracker.task_kwargs
    ok = False
    try:
        tok = tokenize_corpus.with_options(refresh_cache=fresh)(
            config.index_uri,
            config.model,
            config.data,
            data_fingerprint(config.data),
            config.logging.shard_size,
            **common,
        )
        n_shards = math.ceil(tok["examples"] / config.logging.shard_size)
        mfp = model_fingerprint(config.model)
        present = set(state["shards"])
        proj = fit_projections(
            config.index_uri,
            config.model,
            config.logging,
            mfp,
            tok["examples_version"],
            tok["examples"],
            progress=progress,
            **common,
        )
        proj_args = {"projections": proj["artifact"], "projections_digest": proj["digest"]} if proj else {}

        def submit(s: int):
            return log_gradients.with_options(refresh_cache=fresh or s not in present).submit(
                config.index_uri,
                config.model,
                config.logging,
                mfp,
                tok["examples_version"],
                s,
                tok["shard_hashes"][s],
                progress=progress,
                **proj_args,
                **common,
            )

        # Shard 0 alone first: it creates the gradients table, which concurrent creators could clobber.
        first = submit(0).result()
        shards = [first] + [f.result() for f in [submit(s) for s in range(1, n_shards)]]
        # A corpus that shrank leaves shards past the new end behind: they must not be scored.
        after = prune_index(config.index_uri, keep_shards=n_shards)
        # Table versions restart after a drop, so after an overwrite a cached curvature could be stale.
        curv = fit_curvature.with_options(refresh_cache=fresh)(
            config.index_uri, config.curvature, shards[0]["layout"], after["gradients_version"], **common
        )
        tokens = sum(s["tokens"] for s in shards)
        seconds = sum(s["seconds"] for s in shards)
        manifest = {
            "config": config.model_dump(mode="json", exclude={"overwrite", "tracking"}),
            "model_fingerprint": mfp,
            "data_fingerprint": data_fingerprint(config.data),
            "layout": shards[0]["layout"],
            "dim": shards[0]["dim"],
            "full_gradient_params": shards[0]["full_gradient_params"],
            "num_examples": tok["examples"],
            "num_documents": tok["documents"],
            "num_tokens": tok["tokens"],
            "examples_version": tok["examples_version"],
            "gradients_version": after["gradients_version"],
            "curvature_artifact": curv["artifact"],
            "projections_artifact": proj["artifact"] if proj else None,
            "mlflow_run_id": run_id,
            # A calibrated damping stays valid while the curvature it was chosen for does.
            "calibration": _kept_calibration(state["manifest"], config),
        }
        published = publish_index(config.index_uri, manifest, **common)
        tracker.artifact_text("index_config.json", config.model_dump_json(indent=2))
        tracker.artifact_text("manifest.json", json.dumps(manifest, indent=2))
        ok = True
    finally:
        tracker.finish(ok)
    summary = {
        "index_uri": config.index_uri,
        "examples": tok["examples"],
        "documents": tok["documents"],
        "shards": n_shards,
        "dim": manifest["dim"],
        "compression_ratio": manifest["full_gradient_params"] / manifest["dim"],
        "bytes_stored": published["bytes_stored"],
        "tokens_per_s": tokens / seconds if seconds else None,
        "mlflow_run_id": run_id,
        "tracking_uri": tracker.uri,
        "seconds": time.perf_counter() - started,
        "compute_seconds": seconds + curv["seconds"] + (proj["seconds"] if proj else 0.0),
    }
    log.info(
        "index ready at %s: %d examples, %d-dim gradients (%.0f× compression)",
        config.index_uri,
        tok["examples"],
        manifest["dim"],
        summary["compression_ratio"],
    )
    return summary
