"""The `benchmark` flow: ingest, scoring, logging and start-up throughput of the real code paths, on
synthetic vectors at several sizes and on randomly initialized models of real shapes, beside the bounds
(in-memory matmul, plain training) and peers measured in the same run: LanceDB brute force on the stored
vectors, kronfluence and bergson on the same pairwise job as dataworth (one model, the same sequences)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from prefect import flow, get_run_logger

from dataworth.benchmarks.throughput import (
    GPU_MODEL_SHAPES,
    PAIRWISE_BUDGET_S,
    PAIRWISE_MODEL_CAP,
    PAIRWISE_ROUNDS,
    PAIRWISE_SEQ_LENGTH,
    PAIRWISE_TRAIN,
)
from dataworth.config import BenchmarkConfig
from dataworth.evaluation.peers import PEERS, PairwiseJob
from dataworth.reports.terminal import format_table
from tasks.throughput import (
    measure_ann,
    measure_ingest,
    measure_logging,
    measure_pairwise,
    measure_peer,
    measure_scoring,
    measure_startup,
)
from tasks.tracking import tracked_run


def _device(config: BenchmarkConfig) -> str:
    if config.preset == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise ValueError("--preset gpu needs a CUDA device and torch sees none; run `dataworth benchmark --preset cpu`")
    return "cuda"


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def pairwise_job(config: BenchmarkConfig) -> PairwiseJob:
    """The job dataworth, kronfluence and bergson all run: the logging model's GPT-2 shape capped at
    PAIRWISE_MODEL_CAP (heads of 64 dims when the width is capped), config.peer_queries queries against
    PAIRWISE_TRAIN training sequences, the logging measurement's batch size and projection size."""
    m = config.model
    width = min(m.width, PAIRWISE_MODEL_CAP["width"])
    shape = {
        "family": "gpt2",
        "layers": min(m.layers, PAIRWISE_MODEL_CAP["layers"]),
        "width": width,
        "heads": m.heads if width == m.width else max(1, width // 64),
        "vocab": min(m.vocab, PAIRWISE_MODEL_CAP["vocab"]),
    }
    return PairwiseJob(
        shape=shape,
        seq_length=min(config.seq_length, PAIRWISE_SEQ_LENGTH),
        train=PAIRWISE_TRAIN,
        queries=config.peer_queries,
        batch_size=config.batch_size,
        proj_dim=config.proj_dim,
        seed=config.seed,
    )


def summarize(
    config: BenchmarkConfig, per_size: dict, logging: list, startup, pairwise=None, ann=None
) -> dict[str, float]:
    """The headline ratios: ingest and scoring at the largest size, RSS largest ÷ smallest, logging of the
    primary model, one speedup per peer that ran: LanceDB's on the stored vectors (our pairs/s ÷ theirs, at
    the largest size), kronfluence's and bergson's on the pairwise job (dataworth's pairs/s ÷ theirs); the ANN
    part's recall and speedup over the exact pass (largest size)."""
    sizes = sorted(per_size)
    largest, smallest = per_size[sizes[-1]], per_size[sizes[0]]
    out = {
        "write_ratio_last_first": largest["ingest"].write_ratio_last_first,
        "ingest_rows_per_s": largest["ingest"].rows_per_s,
        "scoring_vs_matmul": largest["score"].scoring_vs_matmul,
        "scoring_vs_scan": largest["score"].scoring_vs_scan,
        "pairs_per_s": largest["score"].pairs_per_s,
    }
    if _positive(largest["score"].peak_rss_mb) and _positive(smallest["score"].peak_rss_mb):
        out["peak_rss_ratio"] = largest["score"].peak_rss_mb / smallest["score"].peak_rss_mb
    if logging:
        out["logging_vs_training"] = logging[0].logging_vs_training
        for result in logging[1:]:
            out[f"logging_vs_training.{result.name}"] = result.logging_vs_training
    for peer in config.peers:
        if peer in PEERS:
            if pairwise is not None and _positive(pairwise.speedup(peer)):
                out[f"speedup_vs_{peer}"] = pairwise.speedup(peer)
            continue
        ran = [n for n in sizes if _positive(per_size[n]["peers"][peer].pairs_per_s)]
        if ran:
            n = ran[-1]
            out[f"speedup_vs_{peer}"] = per_size[n]["score"].pairs_per_s / per_size[n]["peers"][peer].pairs_per_s
    if pairwise is not None:
        out["pairwise_pairs_per_s"] = pairwise.systems["dataworth"].pairs_per_s
    if ann is not None:
        out[f"ann_recall_at_{ann.top_k}"] = ann.recall_at_k
        out["ann_speedup_vs_exact"] = ann.speedup
        out["ann_build_seconds"] = ann.build_seconds
        if ann.cold_speedup is not None:
            out["ann_prewarm_seconds"] = ann.prewarm_seconds
            out[f"ann_cold_recall_at_{ann.top_k}"] = ann.cold_recall_at_k
            out["ann_cold_speedup_vs_exact"] = ann.cold_speedup
    if startup is not None:
        out["startup_index_seconds"] = startup.index_seconds
        out["startup_query_seconds"] = startup.query_seconds
        if startup.service_index_seconds is not None:
            out["startup_service_index_seconds"] = startup.service_index_seconds
            out["startup_service_query_seconds"] = startup.service_query_seconds
            out["startup_service_ready_seconds"] = startup.service_ready_seconds
    return out


def _ratio(bound: float, seconds: float | None) -> float | None:
    return None if seconds is None else bound / seconds


def _round(value: float | None) -> float | None:
    """Three significant digits: throughputs span six orders of magnitude."""
    if not _positive(value):
        return value
    return round(value, 2 - math.floor(math.log10(value)))


def _pairwise_table(pairwise) -> str:
    job = pairwise.job
    rows = {}
    for system, timed in pairwise.systems.items():
        if timed.pairs_per_s is None:
            continue
        row = {"seconds": timed.seconds, "pairs/s": timed.pairs_per_s}
        if system != "dataworth":
            row["dataworth speedup"] = pairwise.speedup(system)
        rows[system] = {k: _round(v) for k, v in row.items()}
    return (
        f"pairwise job: {pairwise.name}, {job['queries']} queries × {job['train']} training sequences of "
        f"{job['seq_length']} tokens, batches of {job['batch_size']}, {pairwise.threads} torch threads, CPU; "
        f"best of {pairwise.rounds} rounds, the systems taking turns\n\n" + format_table(rows)
    )


def _ann_table(ann) -> str:
    rows = {}
    if ann.cold_speedup is not None:
        rows["index as built (batch 1)"] = {
            f"recall@{ann.top_k}": ann.cold_recall_at_k,
            "ANN+rerank s": ann.cold_ann_seconds,
            "search s": ann.cold_search_seconds,
            "exact pass s": ann.cold_exact_seconds,
            "speedup": ann.cold_speedup,
        }
    rows["prewarmed, as a query runs (batch 2)"] = {
        f"recall@{ann.top_k}": ann.recall_at_k,
        "ANN+rerank s": ann.ann_seconds,
        "search s": ann.search_seconds,
        "exact pass s": ann.exact_seconds,
        "speedup": ann.speedup,
    }
    refine = f", refine_factor {ann.refine_factor}" if ann.refine_factor else ""
    prewarm = f", prewarm {ann.prewarm_seconds:.2f} s" if ann.prewarm_seconds is not None else ""
    return (
        f"ANN + exact rerank at {ann.size:,} rows: {ann.index_type}, {ann.partitions} partitions"
        + (f", {ann.sub_vectors} sub-vectors" if ann.sub_vectors else "")
        + (f", {ann.bits} bits a value" if ann.bits else "")
        + f", nprobes {ann.nprobes}{refine}, {ann.candidates} candidates per query, two batches of {ann.queries} "
        f"queries, influence against its exact streaming pass; build {_round(ann.build_seconds)} s{prewarm}\n\n"
        + format_table({name: {k: _round(v) for k, v in row.items()} for name, row in rows.items()})
    )


def render(
    config: BenchmarkConfig,
    per_size: dict,
    logging: list,
    startup,
    summary: dict,
    device: str,
    pairwise=None,
    ann=None,
) -> str:
    """The plain-text report: one row per size, one per logging model, the pairwise job, the summary, the notes."""
    rows = {}
    for n, r in per_size.items():
        score = r["score"]
        row = {
            "ingest rows/s": r["ingest"].rows_per_s,
            "write last/first": r["ingest"].write_ratio_last_first,
            "pairs/s (4 modes)": score.pairs_per_s,
            "matmul pairs/s": score.matmul_scores_per_s / score.modes,
            "vs matmul": score.scoring_vs_matmul,
            "first pass vs matmul": _ratio(score.matmul_seconds, score.first_pass_seconds),
            "vs scan": score.scoring_vs_scan,
            "peak RSS MB": score.peak_rss_mb,
        }
        for peer, p in r["peers"].items():
            if p.pairs_per_s is not None:
                row[f"{peer} pairs/s"] = p.pairs_per_s
                row[f"speedup vs {peer}"] = score.pairs_per_s / p.pairs_per_s
        rows[f"{n:,} rows"] = {k: _round(v) for k, v in row.items()}
    models = {
        m.name: {
            "logging tokens/s": _round(m.logging_tokens_per_s),
            "training tokens/s": _round(m.training_tokens_per_s),
            "logging ÷ training": _round(m.logging_vs_training),
        }
        for m in logging
    }
    lines = [
        f"\ndataworth benchmark --preset {config.preset} (device {device}, dim {config.dim}, shards of "
        f"{config.shard_size}, {config.num_queries} queries)\n",
        format_table(rows),
    ]
    if models:
        lines += ["", format_table(models)]
    if pairwise is not None:
        lines += ["", _pairwise_table(pairwise)]
    if ann is not None:
        lines += ["", _ann_table(ann)]
    lines += ["", "summary:"] + [f"  {k:<36} {v:.4g}" for k, v in summary.items()]
    notes = [f"{p.peer}: {p.note}" for p in next(iter(per_size.values()))["peers"].values() if p.pairs_per_s is None]
    if pairwise is not None:
        notes += [f"pairwise {system}: {timed.note}" for system, timed in pairwise.systems.items() if timed.note]
    if startup is not None:
        notes.append(
            f"start-up: `dataworth index` {startup.index_seconds:.1f} s, `dataworth query` "
            f"{startup.query_seconds:.1f} s on a tiny corpus (target ≤ 5 s)"
        )
        if startup.service_index_seconds is not None:
            notes.append(
                f"start-up with `dataworth serve` running: `dataworth index` {startup.service_index_seconds:.1f} s, "
                f"`dataworth query` {startup.service_query_seconds:.1f} s (the service took "
                f"{startup.service_ready_seconds:.1f} s to start, once)"
            )
    unisolated = [n for n, r in per_size.items() if r["score"].peak_rss_mb is None]
    if unisolated:
        notes.append(f"peak RSS not measured at {unisolated} rows (scored in-process: rss_max_size)")
    notes.append(
        "a pair is one query × stored row: dataworth computes its four mode scores, a peer its one dot score; "
        "a score is one pair × mode, the unit of the matmul bound. In the pairwise job a pair is one query × "
        "training sequence, one gradient dot score, from the model and the token sequences in memory"
    )
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


@flow(name="benchmark", log_prints=True)
def benchmark_flow(config: BenchmarkConfig) -> dict:
    """Time ingest, scoring, logging and start-up on synthetic data; log every figure to MLflow."""
    log = get_run_logger()
    device = _device(config)
    workspace = Path(config.workspace).absolute()
    workspace.mkdir(parents=True, exist_ok=True)
    config_path = workspace / "benchmark_config.yaml"
    with tracked_run(
        config.tracking, "benchmark", config, tags={"dataworth.preset": config.preset}, config_path=config_path
    ) as run:
        per_size: dict[int, dict] = {}
        ann = None
        for n in config.sizes:
            index_uri = str(workspace / f"index-{n}")
            ingest = run.log_result(
                f"ingest_{n}",
                measure_ingest(index_uri, n, config.dim, config.shard_size, config.seed, return_state=True),
            )
            isolated = config.rss_max_size is None or n <= config.rss_max_size
            score = run.log_result(
                f"score_{n}",
                measure_scoring(
                    index_uri,
                    n,
                    config.num_queries,
                    config.dim,
                    config.block_dim,
                    config.top_k,
                    config.train_batch_size,
                    config.seed,
                    device,
                    isolated,
                    return_state=True,
                ),
            )
            peers = {
                peer: run.log_result(
                    f"{peer}_{n}",
                    measure_peer(
                        peer,
                        index_uri,
                        n,
                        config.peer_queries,
                        config.dim,
                        config.top_k,
                        config.seed,
                        return_state=True,
                    ),
                )
                for peer in config.peers
                if peer not in PEERS  # kronfluence and bergson need a model: the pairwise job below
            }
            per_size[n] = {"ingest": ingest, "score": score, "peers": peers}
            if config.ann and n == config.sizes[-1]:
                ann = run.log_result(
                    f"ann_{n}",
                    measure_ann(
                        index_uri,
                        n,
                        config.num_queries,
                        config.dim,
                        config.block_dim,
                        config.top_k,
                        config.train_batch_size,
                        config.seed,
                        config.ann_candidates,
                        config.ann_nprobes,
                        config.ann_refine_factor,
                        config.ann_index_type,
                        return_state=True,
                    ),
                )
            if not config.keep_indexes:
                shutil.rmtree(index_uri, ignore_errors=True)
        shapes = [
            (
                f"gpt2-{config.model.layers}x{config.model.width}-float32",
                {"family": "gpt2", **config.model.model_dump()},
                "float32",
                "float32",
            )
        ]
        if device == "cuda":
            # each bfloat16 shape twice: projected in float32 (the default) and in the model's dtype
            for name in config.gpu_models:
                shapes += [
                    (f"{name}-bfloat16", GPU_MODEL_SHAPES[name], "bfloat16", "float32"),
                    (f"{name}-bfloat16-project-in-model-dtype", GPU_MODEL_SHAPES[name], "bfloat16", "model"),
                ]
        logging = [
            run.log_result(
                f"logging_{name}",
                measure_logging(
                    name,
                    shape,
                    config.seq_length,
                    config.batch_size,
                    config.steps,
                    config.proj_dim,
                    dtype,
                    device,
                    config.seed,
                    projection_dtype,
                    return_state=True,
                ),
            )
            for name, shape, dtype, projection_dtype in shapes
        ]
        model_peers = [peer for peer in config.peers if peer in PEERS]
        pairwise = None
        if model_peers:
            pairwise = run.log_result(
                "pairwise",
                measure_pairwise(
                    str(workspace),
                    pairwise_job(config),
                    model_peers,
                    PAIRWISE_ROUNDS,
                    PAIRWISE_BUDGET_S,
                    return_state=True,
                ),
            )
        startup = None
        if config.startup:
            tracking = (
                ["--mlflow-uri", run.uri, "--experiment", f"{config.tracking.experiment}-startup"]
                if run.enabled
                else ["--no-mlflow"]
            )
            startup = run.log_result(
                "startup", measure_startup(str(workspace), tracking, config.seed, return_state=True)
            )
        summary = summarize(config, per_size, logging, startup, pairwise, ann)
        run.metrics(summary)
        text = render(config, per_size, logging, startup, summary, device, pairwise, ann)
        run.artifact_text("benchmark.md", text)
        print(text)
        payload = {
            **summary,
            "preset": config.preset,
            "device": device if device == "cpu" else torch.cuda.get_device_name(),
            "cpus": os.cpu_count(),
            "sizes": {
                str(n): {
                    **r["ingest"].model_dump(),
                    **{f"score_{k}": v for k, v in r["score"].model_dump().items()},
                    "peers": {p: v.model_dump() for p, v in r["peers"].items()},
                }
                for n, r in per_size.items()
            },
            "logging": [m.model_dump() for m in logging],
            "startup": None if startup is None else startup.model_dump(),
            "pairwise": None if pairwise is None else pairwise.model_dump(),
            "ann": None if ann is None else ann.model_dump(),
        }
        if config.json_path:
            path = Path(config.json_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(payload, indent=2))
            run.artifact(path)
            log.info("benchmark summary written to %s", path)
    return {**payload, "table": text, "mlflow_run_id": run.run_id, "tracking_uri": run.uri, "json": config.json_path}
