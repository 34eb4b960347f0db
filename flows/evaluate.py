"""The `evaluate` flow: is the attribution right? One table of methods × metrics, logged to MLflow.

benchmark model → index → full score matrices (every mode, BM25 and the hybrid modes, kronfluence) → fact tracing,
tail-patch, LDS (one retrained model per random subset), brittleness (retrain without each
query's top-k), leave-one-out on a convex problem, optional damping calibration → report.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect import flow, get_run_logger

from dataworth.benchmarks.tiny_model import checkpoints_dir
from dataworth.config import ALL_SCORE_MODES, QueryConfig
from dataworth.evaluation.config import EvaluateConfig
from dataworth.queries import load_queries
from dataworth.reports.terminal import format_store_precision
from tasks.benchmark import prepare_benchmark
from tasks.evaluate import (
    calibrate_damping,
    choose_calibration,
    fact_tracing_eval,
    kronfluence_eval,
    lds_eval,
    loo_eval,
    plan_brittleness,
    plan_subsets,
    prefix_methods,
    record_calibration,
    retrain_and_measure,
    store_precision_eval,
    tail_patch_eval,
)
from tasks.index import index_state
from tasks.report import assemble_evaluation_report
from tasks.tracking import tracked_run

from .index import index_flow
from .query import query_flow


def _build_index(config: EvaluateConfig, ws: Path, bench, sub_tracking, progress: bool, logging_cfg):
    """(index URI, index summary) of the benchmark corpus; one index per logging and curvature config."""
    index_uri = str(ws / f"index-{logging_cfg.fingerprint()}-{config.curvature.fingerprint()}")
    return index_uri, index_flow(
        bench.index_config(logging_cfg, config.curvature, index_uri, sub_tracking), progress=progress
    )


def _calibrate(config: EvaluateConfig, run, build, logging_cfg, built: tuple[str, dict], queries, **proxy) -> dict:
    """Sweep the damping on the evaluated index and, with calibrate.proj_dims, on one index per projection
    size; the best (size, damping) on the tuning queries is recorded in the manifest of that size's index."""
    cal = config.calibrate
    label = lambda c: f"{c.proj_dim_in}x{c.proj_dim_out}"  # noqa: E731
    candidates = {label(logging_cfg): (logging_cfg, *built)}
    for k in cal.proj_dims:
        cfg = logging_cfg.model_copy(update={"proj_dim_in": k, "proj_dim_out": k})
        if label(cfg) not in candidates:
            candidates[label(cfg)] = (cfg, *build(cfg))
    results = {
        name: calibrate_damping(
            uri,
            queries,
            cal.damping_factors,
            cal.proxy,
            cal.holdout_fraction,
            config.seed,
            config.score.modes,
            record=False,
            task_mixes=cal.task_mixes,
            **proxy,
        )
        for name, (_cfg, uri, _summary) in candidates.items()
    }
    sizes = {
        name: {"proj_dim_in": c.proj_dim_in, "proj_dim_out": c.proj_dim_out} for name, (c, *_) in candidates.items()
    }
    chosen = choose_calibration(results, sizes, bool(cal.proj_dims))
    _cfg, uri, summary = candidates[chosen.pop("size")]
    recorded = run.log_result(
        "record_calibration", record_calibration(uri, {**chosen, "index_uri": uri}, return_state=True)
    )
    run.artifact_text("calibration.json", recorded.as_json)
    return {**chosen, "index_uri": uri, "index": summary}


def _tracin(
    config: EvaluateConfig,
    ws: Path,
    bench,
    sub_tracking,
    progress: bool,
    logging_cfg,
    built: tuple,
    queries,
    calibration,
) -> dict:
    """TracIn over the benchmark's checkpoints: one index per intermediate checkpoint (the evaluated index's logging
    and curvature config, its own projections and curvature), then every gradient mode summed over them and the
    final model, weighted by the learning rate at each; {"path": the tracin-<mode> matrices, "seconds": {method:
    compute of every index, the final model's `built` = (URI, summary) included, and of the summed scoring}}."""
    index_uri, summary = built
    tag = f"{logging_cfg.fingerprint()}-{config.curvature.fingerprint()}"
    uris, seconds = [], summary["compute_seconds"]
    for c in bench.checkpoints:
        uri = str(ws / f"index-{tag}-step-{c['step']}")
        checkpoint = index_flow(
            bench.index_config(logging_cfg, config.curvature, uri, sub_tracking, model_dir=c["path"]), progress=progress
        )
        uris.append(uri)
        seconds += checkpoint["compute_seconds"]
    modes = [m for m in config.score.modes if m in ALL_SCORE_MODES]
    weights = [bench.final_lr, *(c["lr"] for c in bench.checkpoints)]
    # The damping calibrated on the final model's index, when there is one, for every checkpoint's.
    damping = (calibration or {}).get("damping_factor")
    score = config.score.model_copy(
        update={"full_matrix": True, "modes": modes, **({"damping_factor": damping} if damping else {})}
    )
    summed = query_flow(
        QueryConfig(
            index_uri=index_uri,
            queries=queries,
            checkpoint_indexes=uris,
            checkpoint_weights=weights,
            score=score,
            report_dir=str(ws / "reports" / "tracin"),
            tracking=sub_tracking,
        ),
        relevant=bench.relevant,
        title=f"dataworth evaluate: {config.benchmark}, TracIn over {1 + len(uris)} checkpoints",
    )
    path = prefix_methods(summed["full_matrix"], "tracin-", str(ws / "eval" / f"tracin-{tag}.npz"))
    seconds += summed["compute_seconds"]
    return {
        "path": path,
        "seconds": {f"tracin-{m}": seconds for m in modes},
        "indexes": [index_uri, *uris],
        "weights": weights,
        "steps": [c["step"] for c in bench.checkpoints],
    }


@flow(name="evaluate")
def evaluate_flow(config: EvaluateConfig = EvaluateConfig(), progress: bool = True) -> dict:
    """Measure attribution quality on a generated benchmark; print and report the table."""
    log = get_run_logger()
    ws = Path(config.workspace).absolute() / config.benchmark
    with tracked_run(
        config.tracking,
        f"evaluate-{config.benchmark}",
        config,
        tags={"dataworth.flow": "evaluate"},
        config_path=ws / "evaluate_config.yaml",
    ) as run:
        sub_tracking = run.child_config(config.tracking)
        # Trained again when the model, or a checkpoint asked for, is gone from disk (a cached result would name it).
        saved = len(list(checkpoints_dir(ws / "model").glob("step-*"))) if config.checkpoints else 0
        fresh = not (ws / "model" / "config.json").exists() or saved != config.checkpoints
        bench = run.log_result(
            "prepare_benchmark",
            prepare_benchmark.with_options(refresh_cache=fresh)(
                str(ws),
                config.benchmark,
                config.seed,
                config.train_epochs,
                progress=progress,
                checkpoints=config.checkpoints,
                return_state=True,
            ),
        )
        queries = load_queries(bench.queries)
        logging_cfg = config.logging.model_copy(update={"seed": config.projection_seed})
        if config.optimizer_correction:  # the optimizer.pt the benchmark model was saved with
            logging_cfg = logging_cfg.model_copy(update={"optimizer_state": bench.model_dir})
        build = partial(_build_index, config, ws, bench, sub_tracking, progress)
        index_uri, index = build(logging_cfg)
        state = index_state(index_uri)
        n = state.num_examples
        corpus_key = f"{state.manifest.data_fingerprint}-{state.manifest.model_fingerprint}"

        # Retrained models depend on the corpus, the subsets and the recipe only, never on the scores: they come
        # first, so an LDS-calibrated damping is chosen before the table is scored.
        recipe = config.retrain or bench.recipe()
        calibrate_on_lds = config.calibrate.enabled and config.calibrate.proxy == "lds"
        plan = actual = full = None
        if config.lds.enabled or config.brittleness.enabled or calibrate_on_lds:
            full = retrain_and_measure(index_uri, corpus_key, None, "all", recipe, queries)
        if config.lds.enabled or calibrate_on_lds:
            plan = plan_subsets(
                n,
                config.lds.n_subsets,
                config.lds.fraction,
                config.lds.seed,
                str(ws / "eval" / f"subsets-{config.lds.n_subsets}-{config.lds.seed}.npy"),
            )
            futures = [
                retrain_and_measure.submit(index_uri, corpus_key, keep, key, recipe, queries)
                for keep, key in zip(plan["keeps"], plan["keys"])
            ]
            actual = [f.result() for f in futures]

        calibration = None
        if config.calibrate.enabled:
            proxy = {"masks_path": plan["path"], "actual": actual} if calibrate_on_lds else {"relevant": bench.relevant}
            calibration = _calibrate(config, run, build, logging_cfg, (index_uri, index), queries, **proxy)
            # The table is measured on the chosen index (another projection size, if the sweep preferred one),
            # whose manifest now holds the chosen damping: the query flow scores with it.
            index_uri, index = calibration["index_uri"], calibration.pop("index")
            logging_cfg = logging_cfg.model_copy(update=calibration.get("logging", {}))
            state = index_state(index_uri)

        # BM25 is scored by the query flow, beside the other modes, from the index's full-text index.
        modes = list(dict.fromkeys([*config.score.modes, *(["bm25"] if "bm25" in config.baselines else [])]))
        query = query_flow(
            QueryConfig(
                index_uri=index_uri,
                queries=queries,
                score=config.score.model_copy(update={"full_matrix": True, "modes": modes}),
                report_dir=str(ws / "reports"),
                tracking=sub_tracking,
            ),
            relevant=bench.relevant,
            title=f"dataworth evaluate: {config.benchmark}",
        )
        matrices = [query["full_matrix"]]
        tracin = None
        if config.checkpoints:
            built = (index_uri, index)
            tracin = _tracin(config, ws, bench, sub_tracking, progress, logging_cfg, built, queries, calibration)
            matrices.append(tracin["path"])
        kron = None
        if "kronfluence" in config.baselines:
            kron = run.log_result(
                "kronfluence_scores",
                kronfluence_eval(
                    index_uri, state.examples_version, queries, str(ws / "eval" / "kronfluence.npz"), return_state=True
                ),
            )
            matrices.append(kron.path)

        measured = []
        if config.fact_tracing and bench.kind == "facts":
            measured.append(
                run.log_result(
                    "fact_tracing_eval", fact_tracing_eval(index_uri, matrices, bench.relevant, return_state=True)
                ).table
            )
        if config.tail_patch.enabled:
            tp = config.tail_patch
            tail = tail_patch_eval(
                index_uri, matrices, queries[: tp.max_queries], tp.top_k, tp.lr, tp.optimizer, return_state=True
            )
            measured.append(run.log_result("tail_patch_eval", tail).table)
        lds = None
        if config.lds.enabled:
            lds = run.log_result(
                "lds_eval", lds_eval(matrices, plan["path"], actual, str(ws / "eval"), return_state=True)
            )
            measured.append(lds.table)
        removals = removed = None
        if config.brittleness.enabled:
            cfg = config.brittleness
            removals = plan_brittleness(matrices, cfg.methods, cfg.n_queries, cfg.ks, n, config.seed)
            futures = [
                retrain_and_measure.submit(index_uri, corpus_key, r["keep"], r["key"], recipe, queries)
                for r in removals
            ]
            removed = [f.result() for f in futures]
        loo = run.log_result("loo_eval", loo_eval(config.seed, return_state=True)) if config.loo else None
        precision = None
        if config.store_dtypes and state.manifest.config.logging.storage_dtype == "float32":
            precision = run.log_result(
                "store_precision_eval",
                store_precision_eval(
                    index_uri,
                    queries,
                    config.score,
                    config.store_dtypes,
                    str(ws / "eval" / "stores"),
                    return_state=True,
                ),
            )
            run.artifact_text("store_precision.json", precision.model_dump_json(indent=2))

        report = assemble_evaluation_report(
            config,
            str(ws / "reports"),
            {"index": index_uri, "mlflow run": str(run.run_id), "model": bench.model_dir},
            matrices,
            measured,
            (bench.num_documents, n, len(queries)),
            logging_cfg,
            lds_scatter=lds.scatter if lds else None,
            removals=removals,
            removed_log_probs=removed,
            full_log_probs=full,
            kronfluence_seconds=kron.seconds if kron else None,
            attribution_seconds=index["compute_seconds"] + query["compute_seconds"],
            search_seconds=query.get("search_seconds", 0.0),
            method_seconds=tracin["seconds"] if tracin else None,
            tracin={"steps": tracin["steps"], "weights": tracin["weights"]} if tracin else None,
            loo=loo.model_dump() if loo else None,
            calibration=calibration,
        )
        for path in report.plots:
            run.artifact(path, "plots")
        run.artifact(report.report)
        run.artifact(report.markdown)
        run.artifact_text("evaluation.json", report.record)
        print(report.summary)
        if precision:
            print(format_store_precision(precision.table))
    log.info("evaluation report: %s", report.report)
    return {
        "table": report.table,
        "loo": loo.model_dump() if loo else None,
        "calibration": calibration,
        "report": report.report,
        "mlflow_run_id": run.run_id,
        "tracking_uri": run.uri,
        "index_uri": index_uri,
        "store_precision": precision.table if precision else None,
        "tracin": {k: tracin[k] for k in ("indexes", "weights")} if tracin else None,
    }
