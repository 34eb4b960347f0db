"""The `evaluate` flow: is the attribution right? One table of methods × metrics, logged to MLflow.

benchmark model → index → full score matrices (every mode, BM25, kronfluence) → fact tracing,
tail-patch, LDS (one retrained model per random subset), brittleness (retrain without each
query's top-k), leave-one-out on a convex problem, optional damping calibration → report.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger

from dataworth.config import QueryConfig
from dataworth.evaluation.config import EvaluateConfig
from dataworth.queries import load_queries
from dataworth.reports.evaluation_report import evaluation_plots, format_table, render_evaluation_report
from dataworth.reports.query_report import write_report
from dataworth.training import RetrainConfig
from tasks.benchmark import benchmark_index_config, prepare_benchmark
from tasks.evaluate import (
    bm25_scores,
    calibrate_damping,
    fact_tracing_eval,
    keep_key,
    kronfluence_eval,
    lds_eval,
    load_matrices,
    loo_eval,
    plan_subsets,
    rank_correlations,
    record_calibration,
    removal_sets,
    retrain_and_measure,
    tail_patch_eval,
)
from tasks.index import index_state
from tasks.tracking import Tracker

from .index import index_flow
from .query import query_flow


def _merge(table: dict, results: dict) -> None:
    for method, metrics in results.items():
        table.setdefault(method, {}).update(metrics)


def recipe_from(train_kwargs: dict) -> RetrainConfig:
    """The benchmark model's own training recipe, for retraining on subsets."""
    return RetrainConfig(**{k: v for k, v in train_kwargs.items() if k in RetrainConfig.model_fields})


def _brittleness(config, index_uri, corpus_key, recipe, queries, scores, n, full):
    """Mean over queries of the increase of the query loss (= decrease of log p) per k, per method."""
    cfg = config.brittleness
    curves: dict[str, dict[str, float]] = {}
    pending = []
    for method in [*cfg.methods, "random"]:
        source = scores[cfg.methods[0] if method == "random" else method]
        for qi in range(min(cfg.n_queries, source.shape[0])):
            for k in cfg.ks:
                top, rand = removal_sets(source, qi, k, n, config.seed)
                keep = rand if method == "random" else top
                fut = retrain_and_measure.submit(index_uri, corpus_key, keep, keep_key(keep, n), recipe, queries)
                pending.append((method, qi, k, fut))
    deltas: dict[tuple[str, int], list[float]] = {}
    for method, qi, k, fut in pending:
        deltas.setdefault((method, k), []).append(full[qi] - fut.result()[qi])
    for (method, k), vals in deltas.items():
        curves.setdefault(method, {})[str(k)] = float(np.mean(vals))
    return curves


def _build_index(config: EvaluateConfig, ws: Path, bench: dict, sub_tracking, progress: bool, logging_cfg):
    """(index URI, index summary) of the benchmark corpus; one index per logging and curvature config."""
    index_uri = str(ws / f"index-{logging_cfg.fingerprint()}-{config.curvature.fingerprint()}")
    return index_uri, index_flow(
        benchmark_index_config(bench, logging_cfg, config.curvature, index_uri, sub_tracking), progress=progress
    )


def _calibrate(config: EvaluateConfig, build, logging_cfg, built: tuple[str, dict], queries, common, **proxy) -> dict:
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
            **proxy,
            **common,
        )
        for name, (_cfg, uri, _summary) in candidates.items()
    }
    best = max(results, key=lambda name: results[name]["tune"])
    cfg, uri, summary = candidates[best]
    chosen = dict(results[best])
    if cal.proj_dims:
        chosen.update(
            proj_dim=best,
            logging={"proj_dim_in": cfg.proj_dim_in, "proj_dim_out": cfg.proj_dim_out},
            proj_sweep={
                name: {"damping_factor": r["damping_factor"], "tune": r["tune"], "test": r["test"]}
                for name, r in results.items()
            },
        )
    record_calibration(uri, {**chosen, "index_uri": uri}, **common)
    return {**chosen, "index_uri": uri, "index": summary}


@flow(name="evaluate")
def evaluate_flow(config: EvaluateConfig = EvaluateConfig(), progress: bool = True) -> dict:
    """Measure attribution quality on a generated benchmark; print and report the table."""
    log = get_run_logger()
    ws = Path(config.workspace).absolute() / config.benchmark
    tracker = Tracker(config.tracking)
    run_id = tracker.start(
        f"evaluate-{config.benchmark}", config.model_dump(mode="json"), {"dataworth.flow": "evaluate"}
    )
    common, sub_tracking = tracker.task_kwargs, tracker.child_config(config.tracking)
    ok = False
    try:
        fresh = not (ws / "model" / "config.json").exists()
        bench = prepare_benchmark.with_options(refresh_cache=fresh)(
            str(ws), config.benchmark, config.seed, config.train_epochs, progress=progress, **common
        )
        queries = load_queries(bench["queries"])
        logging_cfg = config.logging.model_copy(update={"seed": config.seed})
        build = partial(_build_index, config, ws, bench, sub_tracking, progress)
        index_uri, index = build(logging_cfg)
        state = index_state(index_uri)
        n = state["num_examples"]
        corpus_key = f"{state['manifest']['data_fingerprint']}-{state['manifest']['model_fingerprint']}"

        # Retrained models depend on the corpus, the subsets and the recipe only, never on the scores: they come
        # first, so an LDS-calibrated damping is chosen before the table is scored.
        recipe = config.retrain or recipe_from(bench["train_kwargs"])
        calibrate_on_lds = config.calibrate.enabled and config.calibrate.proxy == "lds"
        plan = actual = full = None
        if config.lds.enabled or config.brittleness.enabled or calibrate_on_lds:
            full = retrain_and_measure(
                index_uri, corpus_key, list(range(n)), keep_key(list(range(n)), n), recipe, queries
            )
        if config.lds.enabled or calibrate_on_lds:
            plan = plan_subsets(
                n,
                config.lds.n_subsets,
                config.lds.fraction,
                config.lds.seed,
                str(ws / "eval" / f"subsets-{config.lds.n_subsets}-{config.lds.seed}.npy"),
            )
            futures = [
                retrain_and_measure.submit(index_uri, corpus_key, np.flatnonzero(m).tolist(), key, recipe, queries)
                for m, key in zip(np.load(plan["path"]), plan["keys"])
            ]
            actual = [f.result() for f in futures]

        calibration = None
        if config.calibrate.enabled:
            proxy = (
                {"masks_path": plan["path"], "actual": actual}
                if calibrate_on_lds
                else {"relevant": bench.get("relevant")}
            )
            calibration = _calibrate(config, build, logging_cfg, (index_uri, index), queries, common, **proxy)
            # The table is measured on the chosen index (another projection size, if the sweep preferred one),
            # whose manifest now holds the chosen damping: the query flow scores with it.
            index_uri, index = calibration["index_uri"], calibration.pop("index")
            logging_cfg = logging_cfg.model_copy(update=calibration.get("logging", {}))
            state = index_state(index_uri)

        query = query_flow(
            QueryConfig(
                index_uri=index_uri,
                queries=queries,
                score=config.score.model_copy(update={"full_matrix": True}),
                report_dir=str(ws / "reports"),
                tracking=sub_tracking,
            ),
            relevant=bench.get("relevant"),
            title=f"dataworth evaluate: {config.benchmark}",
        )
        matrices = [str(ws / "reports" / "score-matrix.npz")]
        if "bm25" in config.baselines:
            matrices.append(bm25_scores(index_uri, state["examples_version"], queries, str(ws / "eval" / "bm25.npz")))
        kron = None
        if "kronfluence" in config.baselines:
            kron = kronfluence_eval(
                index_uri, state["examples_version"], queries, str(ws / "eval" / "kronfluence.npz"), **common
            )
            matrices.append(kron["path"])

        table: dict[str, dict[str, float]] = {}
        if config.fact_tracing and bench["kind"] == "facts":
            _merge(table, fact_tracing_eval(index_uri, matrices, bench["relevant"], **common))
        if config.tail_patch.enabled:
            tp = config.tail_patch
            _merge(
                table,
                tail_patch_eval(
                    index_uri, matrices, queries[: tp.max_queries], tp.top_k, tp.lr, tp.optimizer, **common
                ),
            )

        scores, _ = load_matrices(matrices[0])
        for p in matrices[1:]:
            scores.update(load_matrices(p)[0])
        lds_scatter = brittleness = None
        if config.lds.enabled:
            _merge(table, lds_eval(matrices, plan["path"], actual, str(ws / "eval"), **common))
            lds_scatter = json.loads((ws / "eval" / "lds_scatter.json").read_text())
        if config.brittleness.enabled:
            brittleness = _brittleness(config, index_uri, corpus_key, recipe, queries, scores, n, full)
            for method, curve in brittleness.items():
                table.setdefault(method, {}).update({f"brittle@{k}": v for k, v in curve.items()})
        loo = loo_eval(config.seed, **common) if config.loo else None
        if kron is not None:
            for method, rho in rank_correlations(matrices, "kronfluence").items():
                table.setdefault(method, {})["ρ vs kronfluence"] = rho
            table["kronfluence"]["seconds"] = kron["seconds"]
        for method in ("dot", "influence", "relatif", "cosine"):
            if method in table:
                # Compute time of logging, curvature, query gradients and scoring (all modes share it).
                table[method]["seconds"] = index["compute_seconds"] + query["compute_seconds"]

        damping = (
            config.score.damping_factor or (calibration or {}).get("damping_factor") or config.curvature.damping_factor
        )
        notes = [
            f"{config.benchmark}: {bench['num_documents']} documents, {n} examples, {len(queries)} queries; "
            f"projection {logging_cfg.projection} {logging_cfg.proj_dim_in}×{logging_cfg.proj_dim_out} per layer"
            + (
                f", KFAC-whitened (λ {logging_cfg.precondition_damping:g} × mean eigenvalue)"
                if logging_cfg.precondition == "kfac"
                else ""
            )
            + f"; curvature {config.curvature.kind}, damping {damping:g}"
            + (" (calibrated)." if calibration and config.score.damping_factor is None else ".")
        ]
        if loo:
            notes.append(
                f"Leave-one-out on softmax regression: Pearson {loo['pearson_hessian']:.3f} (exact Hessian), "
                f"{loo['pearson_fisher']:.3f} (empirical Fisher, as dataworth's raw curvature)."
            )
        if calibration:
            notes.append(
                f"Calibrated damping factor {calibration['damping_factor']} on {calibration['proxy']} "
                f"(recorded in the index manifest): {json.dumps(calibration['sweep'])}"
            )
            if "proj_sweep" in calibration:
                notes.append(
                    f"Projection size chosen on {calibration['proxy']}: {calibration['proj_dim']} per layer "
                    f"(index {calibration['index_uri']}); tune/test per size at its best damping: "
                    f"{json.dumps(calibration['proj_sweep'])}"
                )
        samples = {m: s.ravel().tolist() for m, s in scores.items()}
        plots = evaluation_plots(lds_scatter, brittleness, samples)
        (ws / "reports").mkdir(parents=True, exist_ok=True)
        for name, png in plots.items():
            (ws / "reports" / name).write_bytes(png)
            tracker.artifact(ws / "reports" / name, "plots")
        html = render_evaluation_report(
            f"dataworth evaluate: {config.benchmark}",
            table,
            {"index": index_uri, "mlflow run": str(run_id), "model": bench["model_dir"]},
            plots,
            notes,
        )
        report = write_report(html, ws / "reports" / "evaluation.html")
        markdown = format_table(table)
        (ws / "reports" / "evaluation.md").write_text(markdown + "\n\n" + "\n".join(f"- {x}" for x in notes) + "\n")
        tracker.artifact(report)
        tracker.artifact(ws / "reports" / "evaluation.md")
        tracker.artifact_text(
            "evaluation.json",
            json.dumps({"table": table, "loo": loo, "calibration": calibration}, indent=2, default=float),
        )
        print(f"\n{markdown}\n")
        for note in notes:
            print(f"- {note}")
        ok = True
    finally:
        tracker.finish(ok)
    log.info("evaluation report: %s", report)
    return {
        "table": table,
        "loo": loo,
        "calibration": calibration,
        "report": str(report),
        "mlflow_run_id": run_id,
        "tracking_uri": tracker.uri,
        "index_uri": index_uri,
    }
