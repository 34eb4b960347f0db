"""Throughput stages of `dataworth benchmark`: each times one real code path of the pipeline through its
public API (IndexStore writes and reads, the Scorer, gradient logging, the command line) on synthetic
data, next to the bound or peer it is compared with, and returns the figures as metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from dataworth.attribution.curvature import Curvature, FisherAccumulator
from dataworth.attribution.gradients import log_example_gradients
from dataworth.attribution.hybrid import ann_query_vectors, recall_at_k, rerank
from dataworth.attribution.projection import Block, Layout
from dataworth.attribution.scoring import Scorer
from dataworth.benchmarks.throughput import (
    best_of,
    matmul_seconds,
    max_rss_mb,
    random_causal_lm,
    random_examples,
    synchronize,
    synthetic_queries,
    synthetic_vectors,
    training_step_seconds,
)
from dataworth.config import DEFAULT_SCORE_MODES, VECTOR_INDEX_TYPES, CurvatureConfig, LoggingConfig
from dataworth.errors import ConfigError
from dataworth.evaluation.peers import KRONFLUENCE_STRATEGY, PEERS, PairwiseJob, missing_peer, time_pairwise_rounds
from storage import IndexStore

from .common import StageResult, compute_norms, gradient_batches

# Rows of the synthetic corpus the block-diagonal Fisher is fitted on (a real fit, as the index flow does).
FIT_ROWS = 4096
# Shards averaged at each end of the ingest for the last/first write-time ratio (one shard is noisy).
ENDS = 5


def _local_dir(uri: str) -> str | None:
    return IndexStore(uri).local_path


class Ingested(StageResult):
    """Synthetic gradient shards written into a fresh index with IndexStore.write_gradient_shard."""

    size: int = Field(description="Rows written.")
    shards: int = Field(description="write_gradient_shard calls.")
    seconds: float = Field(description="Time of the shard writes and the compaction (vector generation excluded).")
    compact_seconds: float = Field(description="Time of compact_gradients after the last shard.")
    rows_per_s: float = Field(description="Rows written per second of write time.")
    first_shard_s: float = Field(description="Mean write time of the first shards.")
    last_shard_s: float = Field(description="Mean write time of the last shards.")
    write_ratio_last_first: float = Field(description="last_shard_s ÷ first_shard_s (1 = constant cost per shard).")
    bytes_stored: int = Field(description="Bytes the index occupies.")

    def metrics(self) -> dict[str, float]:
        p = f"n{self.size}."
        return {
            p + "ingest_rows_per_s": self.rows_per_s,
            p + "ingest_seconds": self.seconds,
            p + "compact_seconds": self.compact_seconds,
            p + "first_shard_s": self.first_shard_s,
            p + "last_shard_s": self.last_shard_s,
            p + "write_ratio_last_first": self.write_ratio_last_first,
            p + "bytes_stored": self.bytes_stored,
        }


@task(name="measure_ingest", cache_policy=NO_CACHE)
def measure_ingest(index_uri: str, size: int, dim: int, shard_size: int, seed: int) -> Ingested:
    """Write `size` synthetic rows as shards of `shard_size` into a fresh index, timing every write, then
    compact and check the table as publishing an index does."""
    local = _local_dir(index_uri)
    if local is not None and os.path.exists(local):
        shutil.rmtree(local)
    store = IndexStore(index_uri)
    store.create_gradient_table(dim)
    times = []
    for shard, start in enumerate(range(0, size, shard_size)):
        rows = min(shard_size, size - start)
        vectors = synthetic_vectors(seed, shard, rows, dim).numpy()
        ids = np.arange(start, start + rows, dtype=np.int64)
        begin = time.perf_counter()
        store.write_gradient_shard(shard, ids, vectors, new=True)  # as the index flow writes a shard not yet stored
        times.append(time.perf_counter() - begin)
    # What publishing an index does after its shards: merge the fragments, check one row per example.
    begin = time.perf_counter()
    store.compact_gradients(keep_old_versions=False)
    compact = time.perf_counter() - begin
    store.check_gradient_ids(size)
    ends = min(ENDS, max(1, len(times) // 2))
    first, last = float(np.mean(times[:ends])), float(np.mean(times[-ends:]))
    seconds = float(sum(times)) + compact
    get_run_logger().info("ingest %d rows: %.0f rows/s, last/first shard %.2f", size, size / seconds, last / first)
    return Ingested(
        size=size,
        shards=len(times),
        seconds=seconds,
        compact_seconds=compact,
        rows_per_s=size / seconds,
        first_shard_s=first,
        last_shard_s=last,
        write_ratio_last_first=last / first,
        bytes_stored=store.bytes_stored(),
    )


class Scored(StageResult):
    """The Scorer's streaming pass over a stored synthetic index, all four modes, beside the matmul bound."""

    size: int = Field(description="Stored rows scored.")
    queries: int = Field(description="Query vectors.")
    modes: int = Field(description="Score modes computed together.")
    norms_seconds: float = Field(
        description="One pass computing the stored rows' norms (an indexing cost: once per curvature and damping)."
    )
    seconds: float = Field(
        description="The scoring pass (read, score every mode, keep the top-k), the process's second: set up as the "
        "matmul bound is."
    )
    first_pass_seconds: float | None = Field(
        None, description="The same pass as the process's first, its one-time set-up (threads, buffers) included."
    )
    pairs_per_s: float = Field(description="queries × rows ÷ seconds (every mode of a pair computed).")
    scores_per_s: float = Field(description="queries × rows × modes ÷ seconds.")
    matmul_seconds: float = Field(description="In-memory matmul [modes·queries, dim] × [dim, rows].")
    matmul_scores_per_s: float = Field(description="queries × rows × modes ÷ matmul_seconds.")
    scoring_vs_matmul: float = Field(description="scores_per_s ÷ matmul_scores_per_s (1 = at the matmul bound).")
    scan_seconds: float | None = Field(
        None, description="The same pass reading the rows onto the scoring device without scoring them: the read bound."
    )
    scoring_vs_scan: float | None = Field(None, description="scan_seconds ÷ seconds (1 = at the read bound).")
    peak_rss_mb: float | None = Field(description="Peak resident memory of the scoring process (None: not isolated).")
    rss_growth_mb: float | None = Field(description="Peak RSS during scoring minus the peak before it.")
    peak_gpu_mb: float | None = Field(None, description="Peak CUDA memory of the scoring (gpu preset).")

    def metrics(self) -> dict[str, float]:
        p = f"n{self.size}."
        out = {
            p + "score_seconds": self.seconds,
            p + "first_pass_seconds": self.first_pass_seconds,
            p + "norms_seconds": self.norms_seconds,
            p + "pairs_per_s": self.pairs_per_s,
            p + "scores_per_s": self.scores_per_s,
            p + "matmul_scores_per_s": self.matmul_scores_per_s,
            p + "scoring_vs_matmul": self.scoring_vs_matmul,
            p + "scoring_vs_scan": self.scoring_vs_scan,
            p + "peak_rss_mb": self.peak_rss_mb,
            p + "rss_growth_mb": self.rss_growth_mb,
            p + "peak_gpu_mb": self.peak_gpu_mb,
        }
        return {k: v for k, v in out.items() if v is not None}


def synthetic_layout(dim: int, block_dim: int) -> Layout:
    """Blocks of block_dim columns (the last one what is left), standing for the modules of a model."""
    starts = range(0, dim, block_dim)
    return Layout(tuple(Block(f"block{i}", 1, min(block_dim, dim - s), s) for i, s in enumerate(starts)))


def fit_synthetic_curvature(size: int, dim: int, block_dim: int, seed: int) -> Curvature:
    """A raw block-diagonal Fisher fitted on the first stored rows (regenerated: the same stream as shard 0)."""
    fisher = FisherAccumulator(synthetic_layout(dim, block_dim), CurvatureConfig(kind="raw", max_block_dim=block_dim))
    fisher.update(synthetic_vectors(seed, 0, min(size, FIT_ROWS), dim))
    return fisher.finalize()


def score_synthetic(
    index_uri: str, size: int, queries: int, dim: int, top_k: int, batch: int, seed: int, device: str, prepared: str
) -> dict:
    """The scoring measurement itself: a query run over an index whose curvature and norms are stored
    (`prepared`: the .pt file measure_scoring wrote); run in a fresh process so its peak RSS is its own."""
    saved = torch.load(prepared, weights_only=True)
    curvature, norms = Curvature.from_bytes(saved["curvature"]), saved["norms"]
    store = IndexStore(index_uri)
    modes = list(DEFAULT_SCORE_MODES)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = max_rss_mb()

    def scoring_pass() -> float:
        scorer = Scorer(synthetic_queries(seed, queries, dim), curvature, modes, top_k, norms=norms, device=device)
        rows = 0
        start = time.perf_counter()
        for ids, vectors in gradient_batches(store, batch):
            scorer.update(ids, vectors.to(device, non_blocking=True))
            rows += len(ids)
        for top in scorer.topk.values():
            top.scores  # noqa: B018 - the results on the host, as a query run writes them
        synchronize(device)
        if rows != size:
            raise RuntimeError(f"the scoring pass read {rows} rows of a {size}-row index")
        return time.perf_counter() - start

    # The first pass of a process also pays its one-time set-up (torch's thread pool, Lance's runtime, first touch
    # of the buffers: about 0.2 s here), which the matmul bound, warmed up, does not; the passes after it are
    # compared with the bound, timed the same way (best_of: a short pass repeated, its best time kept). A query
    # run in `dataworth serve` finds that set-up done.
    first = scoring_pass()
    seconds = best_of(scoring_pass)
    peak = max_rss_mb()
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    # The read bound, measured after the peak: the same batches onto the device, nothing scored.
    start = time.perf_counter()
    for _, vectors in gradient_batches(store, batch):
        vectors.to(device, non_blocking=True)
    synchronize(device)
    scan = time.perf_counter() - start
    bound = matmul_seconds(len(modes) * queries, dim, size, device)
    return {
        "seconds": seconds,
        "first_pass_seconds": first,
        "scan_seconds": scan,
        "matmul_seconds": bound,
        "peak_rss_mb": peak,
        "rss_growth_mb": peak - rss_before,
        "peak_gpu_mb": peak_gpu,
    }


@task(name="measure_scoring", cache_policy=NO_CACHE)
def measure_scoring(
    index_uri: str,
    size: int,
    queries: int,
    dim: int,
    block_dim: int,
    top_k: int,
    batch: int,
    seed: int,
    device: str = "cpu",
    isolated: bool = True,
) -> Scored:
    """Score `queries` synthetic queries in all four modes against the stored index with the Scorer (a fitted
    block-diagonal Fisher, the rows' norms computed first, as indexing stores them), in a fresh process when
    `isolated` so its peak RSS is the query run's own."""
    # What indexing leaves for a query run: the fitted curvature and the norms ‖(F+λI)^-1/2 g_i‖ (one pass).
    curvature = fit_synthetic_curvature(size, dim, block_dim, seed)
    start = time.perf_counter()
    norms = torch.from_numpy(compute_norms(IndexStore(index_uri), curvature, None, batch))
    norms_seconds = time.perf_counter() - start
    prepared = os.path.join(_local_dir(index_uri) or tempfile.gettempdir(), f"benchmark-prepared-{size}.pt")
    torch.save({"curvature": curvature.to_bytes(), "norms": norms}, prepared)
    args = (index_uri, size, queries, dim, top_k, batch, seed, device, prepared)
    if isolated:
        # spawn, not fork: a fresh interpreter whose memory holds nothing of this one's.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            out = pool.submit(score_synthetic, *args).result()
    else:
        out = score_synthetic(*args)
        out["peak_rss_mb"] = out["rss_growth_mb"] = None  # this process's peak is not the scoring's
    modes = len(DEFAULT_SCORE_MODES)
    scores = modes * queries * size
    get_run_logger().info(
        "score %d rows × %d queries × %d modes: %.3g scores/s, %.2f× the matmul",
        size,
        queries,
        modes,
        scores / out["seconds"],
        out["matmul_seconds"] / out["seconds"],
    )
    return Scored(
        size=size,
        queries=queries,
        modes=modes,
        seconds=out["seconds"],
        first_pass_seconds=out["first_pass_seconds"],
        norms_seconds=norms_seconds,
        pairs_per_s=queries * size / out["seconds"],
        scores_per_s=scores / out["seconds"],
        matmul_seconds=out["matmul_seconds"],
        matmul_scores_per_s=scores / out["matmul_seconds"],
        scoring_vs_matmul=out["matmul_seconds"] / out["seconds"],
        scan_seconds=out["scan_seconds"],
        scoring_vs_scan=out["scan_seconds"] / out["seconds"],
        peak_rss_mb=out["peak_rss_mb"],
        rss_growth_mb=out["rss_growth_mb"],
        peak_gpu_mb=out["peak_gpu_mb"],
    )


class AnnMeasured(StageResult):
    """LanceDB's vector index on a stored synthetic index: its build, and ANN + exact rerank against the exact
    streaming pass, in influence (a pure dot product with the prepared query vector (F+λI)^-1 g_q). Two batches
    of queries: the first searches the freshly built index as it is on disk (each probed partition read and decoded
    at the search: `cold_*`); the second, other queries of the same distribution, searches it after
    prewarm_vector_index, as the query task runs it (it prewarms while the query gradients are taken)."""

    size: int = Field(description="Stored rows indexed and searched.")
    queries: int = Field(description="Query vectors of each batch.")
    top_k: int = Field(description="k of the recall.")
    index_type: str = Field(description="IVF_RQ, IVF_SQ, IVF_PQ or IVF_HNSW_SQ.")
    partitions: int = Field(description="IVF partitions of the index.")
    sub_vectors: int | None = Field(description="PQ sub-vectors (IVF_PQ).")
    bits: int | None = Field(None, description="Bits per value of the RaBitQ codes (IVF_RQ).")
    candidates: int = Field(description="M: candidates per query reranked exactly.")
    nprobes: int = Field(description="Partitions searched per query.")
    refine_factor: int | None = Field(description="LanceDB's own refine of the PQ candidates (None: none).")
    build_seconds: float = Field(description="Time to build the vector index.")
    exact_seconds: float = Field(description="The exact streaming pass over every row (influence, top-k), batch 2.")
    ann_seconds: float = Field(description="ANN search + reading the candidates' rows + exact rerank, batch 2.")
    search_seconds: float = Field(description="The ANN search alone, batch 2.")
    recall_at_k: float = Field(description="Mean |ANN+rerank top-k ∩ exact top-k| / k over batch 2's queries.")
    prewarm_seconds: float | None = Field(None, description="prewarm_vector_index, before batch 2.")
    cold_exact_seconds: float | None = Field(None, description="The exact pass of batch 1.")
    cold_ann_seconds: float | None = Field(None, description="ANN + read + rerank of batch 1 (the index not loaded).")
    cold_search_seconds: float | None = Field(None, description="The ANN search alone, batch 1.")
    cold_recall_at_k: float | None = Field(None, description="recall@k of batch 1.")

    @property
    def speedup(self) -> float:
        return self.exact_seconds / self.ann_seconds

    @property
    def cold_speedup(self) -> float | None:
        return None if not self.cold_ann_seconds else self.cold_exact_seconds / self.cold_ann_seconds

    def metrics(self) -> dict[str, float]:
        p = f"n{self.size}."
        cold = {
            p + "ann_prewarm_seconds": self.prewarm_seconds,
            p + "ann_cold_seconds": self.cold_ann_seconds,
            p + "ann_cold_search_seconds": self.cold_search_seconds,
            p + f"ann_cold_recall_at_{self.top_k}": self.cold_recall_at_k,
            p + "ann_cold_speedup_vs_exact": self.cold_speedup,
        }
        return {
            p + "ann_build_seconds": self.build_seconds,
            p + "ann_exact_seconds": self.exact_seconds,
            p + "ann_seconds": self.ann_seconds,
            p + "ann_search_seconds": self.search_seconds,
            p + f"ann_recall_at_{self.top_k}": self.recall_at_k,
            p + "ann_speedup_vs_exact": self.speedup,
            **{k: v for k, v in cold.items() if v is not None},
        }


def _ann_batch(
    store: IndexStore,
    version: int,
    curvature: Curvature,
    q: torch.Tensor,
    top_k: int,
    batch: int,
    candidates: int,
    nprobes: int,
    refine_factor: int | None,
) -> dict[str, float]:
    """One batch of queries: influence's exact streaming pass, then the query task's hybrid-ann path (one search for
    every query, the candidates' rows read by row id, reranked exactly), each timed; recall@k of the ANN top-k."""
    start = time.perf_counter()
    scorer = Scorer(q, curvature, ["influence"], top_k)
    for ids, vectors in gradient_batches(store, batch, version):
        scorer.update(ids, vectors)
    exact = scorer.topk["influence"].ids.numpy()
    exact_seconds = time.perf_counter() - start
    vectors = ann_query_vectors(q, curvature, "influence").numpy()
    start = time.perf_counter()
    found, row_ids = store.search_vector_rows(vectors, candidates, version, nprobes, refine_factor)
    search_seconds = time.perf_counter() - start
    ids, rows = store.read_candidate_rows(found, row_ids, version)
    ranked = rerank(q, curvature, "influence", found, ids, torch.from_numpy(rows))
    ann_seconds = time.perf_counter() - start
    recall = recall_at_k([i for i, _ in ranked], list(exact), top_k)
    return {"exact": exact_seconds, "search": search_seconds, "ann": ann_seconds, "recall": recall}


@task(name="measure_ann", cache_policy=NO_CACHE)
def measure_ann(
    index_uri: str,
    size: int,
    queries: int,
    dim: int,
    block_dim: int,
    top_k: int,
    batch: int,
    seed: int,
    candidates: int,
    nprobes: int,
    refine_factor: int | None = None,
    index_type: str = VECTOR_INDEX_TYPES[0],
) -> AnnMeasured:
    """Build the vector index on the stored synthetic index (as `dataworth index --ann.build` does), then time the
    query side of hybrid-ann-influence against influence's exact pass, for two batches of `queries` (AnnMeasured):
    the first on the index as built, the second after prewarming it."""
    store = IndexStore(index_uri)
    info = store.build_vector_index(index_type)
    version = store.gradients_version()
    curvature = fit_synthetic_curvature(size, dim, block_dim, seed)
    args = (top_k, batch, candidates, nprobes, refine_factor)
    first = synthetic_queries(seed, queries, dim)
    # Warm as the exact pass is (its rows are in the page cache from the ingest, its thread pool started by the
    # scoring measurement): one untimed search of another query opens the index's files first (about 0.1-0.2 s).
    store.search_vectors(-ann_query_vectors(first[:1], curvature, "influence").numpy(), candidates, version, nprobes)
    cold = _ann_batch(store, version, curvature, first, *args)
    prewarm_seconds = store.prewarm_vector_index(version)
    # Other queries of the same clusters (another shard number of the same seed).
    second = synthetic_vectors(seed, -(1 << 20) - queries, queries, dim)
    warm = _ann_batch(store, version, curvature, second, *args)
    get_run_logger().info(
        "ANN %s at %d rows: build %.1f s, prewarm %.2f s; recall@%d %.3f in %.3f s against the exact pass's %.2f s "
        "(%.1f×); the index as built: recall %.3f in %.3f s against %.2f s (%.1f×)",
        index_type,
        size,
        info["build_seconds"],
        prewarm_seconds,
        top_k,
        warm["recall"],
        warm["ann"],
        warm["exact"],
        warm["exact"] / warm["ann"],
        cold["recall"],
        cold["ann"],
        cold["exact"],
        cold["exact"] / cold["ann"],
    )
    return AnnMeasured(
        size=size,
        queries=queries,
        top_k=top_k,
        index_type=index_type,
        partitions=info["partitions"],
        sub_vectors=info["sub_vectors"],
        bits=info["bits"],
        candidates=candidates,
        nprobes=nprobes,
        refine_factor=refine_factor,
        build_seconds=info["build_seconds"],
        exact_seconds=warm["exact"],
        ann_seconds=warm["ann"],
        search_seconds=warm["search"],
        recall_at_k=warm["recall"],
        prewarm_seconds=prewarm_seconds,
        cold_exact_seconds=cold["exact"],
        cold_ann_seconds=cold["ann"],
        cold_search_seconds=cold["search"],
        cold_recall_at_k=cold["recall"],
    )


class PeerMeasured(StageResult):
    """LanceDB's brute-force search over the same stored vectors."""

    peer: str = Field(description="lancedb.")
    size: int = Field(description="Stored rows searched.")
    queries: int = Field(0, description="Queries the peer answered.")
    seconds: float | None = Field(None, description="Time of those queries.")
    pairs_per_s: float | None = Field(None, description="queries × rows ÷ seconds (one dot score per pair).")
    note: str | None = Field(None, description="How the peer was run.")

    def metrics(self) -> dict[str, float]:
        if self.pairs_per_s is None:
            return {}
        return {f"n{self.size}.{self.peer}_pairs_per_s": self.pairs_per_s}


@task(name="measure_peer", cache_policy=NO_CACHE)
def measure_peer(peer: str, index_uri: str, size: int, queries: int, dim: int, top_k: int, seed: int) -> PeerMeasured:
    """LanceDB's own brute-force `search(q).distance_type("dot").limit(k)` over the stored gradients table.
    (kronfluence and bergson compute gradients from a model, not from stored vectors: measure_pairwise.)"""
    if peer != "lancedb":
        raise ConfigError(f"measure_peer times LanceDB on stored vectors, not {peer!r}; measure_pairwise runs {PEERS}")
    import lancedb

    from storage.store import GRADIENTS

    table = lancedb.connect(index_uri).open_table(GRADIENTS)
    vectors = synthetic_queries(seed, queries, dim).numpy()
    table.search(vectors[0]).distance_type("dot").limit(top_k).to_arrow()  # warm-up
    start = time.perf_counter()
    for q in vectors:  # one brute-force scan per query, as a LanceDB user runs them
        table.search(q).distance_type("dot").limit(top_k).to_arrow()
    seconds = time.perf_counter() - start
    return PeerMeasured(
        peer=peer,
        size=size,
        queries=queries,
        seconds=seconds,
        pairs_per_s=queries * size / seconds,
        note=f'search(q).distance_type("dot").limit({top_k}), no vector index, {queries} queries',
    )


class PairwiseTimed(BaseModel):
    """One system's run of the pairwise job, or why it did not run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seconds: float | None = Field(None, description="Timed part of the best round (see dataworth.evaluation.peers).")
    pairs_per_s: float | None = Field(None, description="queries × training sequences ÷ seconds.")
    parts: dict[str, float] = Field(default_factory=dict, description="The timed steps of the best round, in s.")
    rounds_seconds: list[float] = Field(default_factory=list, description="The timed part of every round.")
    note: str | None = Field(None, description="How it was run, or why it was skipped.")


class PairwiseMeasured(StageResult):
    """dataworth and its peers on one pairwise job: same model, data, thread count, in one run."""

    name: str = Field(description="Model shape.")
    job: dict = Field(description="The PairwiseJob: shape, seq_length, train, queries, batch_size, proj_dim, seed.")
    threads: int = Field(description="torch threads of the process the systems ran in.")
    rounds: int = Field(description="Rounds the systems took turns in; each one's best round counts.")
    systems: dict[str, PairwiseTimed] = Field(description="dataworth, then each peer asked for.")

    def speedup(self, peer: str) -> float | None:
        """dataworth pairs/s ÷ the peer's (None when the peer did not run)."""
        ours, theirs = self.systems["dataworth"].pairs_per_s, self.systems[peer].pairs_per_s
        return ours / theirs if ours and theirs else None

    def metrics(self) -> dict[str, float]:
        out = {}
        for system, timed in self.systems.items():
            if timed.pairs_per_s is not None:
                out[f"pairwise.{system}.pairs_per_s"] = timed.pairs_per_s
                out[f"pairwise.{system}.seconds"] = timed.seconds
            if system != "dataworth" and self.speedup(system) is not None:
                out[f"pairwise.speedup_vs_{system}"] = self.speedup(system)
        return out


@contextlib.contextmanager
def _gpus_hidden():
    """Processes started inside see no GPU: the pairwise job runs on the CPU (kronfluence's adapter is CPU-only,
    and bergson would otherwise take any GPU it sees)."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _how(system: str, job: PairwiseJob) -> str:
    k = f"{job.proj_dim}×{job.proj_dim}"
    return {
        "dataworth": f"log_example_gradients + query_gradients ({k} gaussian projections) + Scorer dot mode",
        "kronfluence": f"strategy {KRONFLUENCE_STRATEGY!r} (exact gradients), fit_all_factors + "
        f"compute_pairwise_scores timed, all {job.queries} queries in one batch",
        "bergson": f"build (query index) + score (training set), {k} normal projections, no preconditioner",
    }[system]


@task(name="measure_pairwise", cache_policy=NO_CACHE)
def measure_pairwise(
    workspace: str, job: PairwiseJob, peers: list[str], rounds: int = 1, budget_s: float | None = None
) -> PairwiseMeasured:
    """Score job.queries queries against job.train training sequences of a random-init model with dataworth and
    each peer that is installed, taking turns for up to `rounds` rounds within about `budget_s` seconds (each
    system's best round counts) in one fresh CPU process with this process's torch thread count. A peer not
    installed is reported with its install command, one that fails with its error."""
    log = get_run_logger()
    threads = torch.get_num_threads()
    scratch = Path(workspace, "pairwise")
    scratch.mkdir(parents=True, exist_ok=True)
    missing = {peer: missing_peer(peer) for peer in peers}
    systems = ["dataworth", *(peer for peer in peers if missing[peer] is None)]
    # spawn, not fork: a fresh interpreter holding nothing of this one's memory or threads.
    with _gpus_hidden(), ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = pool.submit(time_pairwise_rounds, systems, job, threads, rounds, str(scratch), budget_s).result()
    timed: dict[str, PairwiseTimed] = {}
    for system in ["dataworth", *peers]:
        run = runs.get(system)
        if run is None:
            timed[system] = PairwiseTimed(note=missing[system])
        elif "error" in run:
            log.warning("pairwise job with %s failed: %s", system, run["error"])
            timed[system] = PairwiseTimed(note=f"failed: {run['error']}")
        else:
            timed[system] = PairwiseTimed(
                seconds=run["seconds"],
                pairs_per_s=run["pairs_per_s"],
                parts=run["parts"],
                rounds_seconds=run["rounds_seconds"],
                note=_how(system, job),
            )
            log.info("pairwise %s: %.3g pairs/s (best of %s s)", system, run["pairs_per_s"], run["rounds_seconds"])
    shape = job.shape
    return PairwiseMeasured(
        name=f"{shape['family']}-{shape['layers']}x{shape['width']}-vocab{shape['vocab']}",
        job=dataclasses.asdict(job),
        threads=threads,
        rounds=len(runs["dataworth"]["rounds_seconds"]),
        systems=timed,
    )


class LoggingMeasured(StageResult):
    """Gradient logging (log_example_gradients) beside plain training forward+backward of the same model."""

    name: str = Field(description="Model shape and dtype.")
    device: str = Field(description="cpu or cuda.")
    tokens_per_batch: int = Field(description="batch_size × seq_length.")
    gradient_dim: int = Field(description="Dimension of one logged gradient.")
    logging_tokens_per_s: float = Field(description="Tokens per second of log_example_gradients.")
    training_tokens_per_s: float = Field(description="Tokens per second of plain training forward+backward.")
    logging_vs_training: float = Field(description="logging_tokens_per_s ÷ training_tokens_per_s.")
    peak_gpu_mb: float | None = Field(None, description="Peak CUDA memory (gpu preset).")

    def metrics(self) -> dict[str, float]:
        p = f"{self.name}."
        out = {
            p + "logging_tokens_per_s": self.logging_tokens_per_s,
            p + "training_tokens_per_s": self.training_tokens_per_s,
            p + "logging_vs_training": self.logging_vs_training,
            p + "peak_gpu_mb": self.peak_gpu_mb,
        }
        return {k: v for k, v in out.items() if v is not None}


@task(name="measure_logging", cache_policy=NO_CACHE)
def measure_logging(
    name: str,
    shape: dict,
    seq_length: int,
    batch_size: int,
    steps: int,
    proj_dim: int,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    projection_dtype: str = "float32",
) -> LoggingMeasured:
    """Tokens/s of log_example_gradients (random projections, every linear layer but the head, projected in
    `projection_dtype`) on a randomly initialized model of `shape`, and of plain training forward+backward of
    the same model, batch and length."""
    torch_dtype = getattr(torch, dtype)
    model = random_causal_lm(**shape, seq_length=seq_length, dtype=torch_dtype, device=device, seed=seed)
    examples = random_examples(shape["vocab"], batch_size * (steps + 1), seq_length, seed)
    cfg = LoggingConfig(
        projection="gaussian",
        proj_dim_in=proj_dim,
        proj_dim_out=proj_dim,
        precondition="none",
        batch_size=batch_size,
        projection_dtype=projection_dtype,
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # The model's config stands in for a tokenizer: logging reads only its pad id.
    batches = log_example_gradients(model, model.config, examples, cfg)
    _, grads = next(batches)  # warm-up batch: draws the projections, starts the thread pool
    synchronize(device)
    start = time.perf_counter()
    for _ in batches:
        pass
    synchronize(device)
    logging_s = (time.perf_counter() - start) / steps
    training_s = training_step_seconds(model, examples, batch_size, steps, device)
    tokens = batch_size * seq_length
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    get_run_logger().info("logging %s: %.2f× plain training", name, training_s / logging_s)
    return LoggingMeasured(
        name=name,
        device=device,
        tokens_per_batch=tokens,
        gradient_dim=int(grads.shape[1]),
        logging_tokens_per_s=tokens / logging_s,
        training_tokens_per_s=tokens / training_s,
        logging_vs_training=training_s / logging_s,
        peak_gpu_mb=peak_gpu,
    )


class StartupMeasured(StageResult):
    """Wall time of the `dataworth index` and `dataworth query` commands on a tiny corpus: their fixed cost."""

    index_seconds: float = Field(description="`dataworth index` of 8 short documents with a 2-layer model.")
    query_seconds: float = Field(description="`dataworth query` of one prompt against that index.")
    service_index_seconds: float | None = Field(
        default=None, description="The same `dataworth index`, run by a `dataworth serve` service already running."
    )
    service_query_seconds: float | None = Field(
        default=None, description="The same `dataworth query`, run by that service."
    )
    service_ready_seconds: float | None = Field(
        default=None, description="From `dataworth serve` started to the service taking commands (paid once)."
    )

    def metrics(self) -> dict[str, float]:
        names = ("index_seconds", "query_seconds", "service_index_seconds", "service_query_seconds")
        names += ("service_ready_seconds",)
        return {f"startup.{n}": getattr(self, n) for n in names if getattr(self, n) is not None}


def _dataworth_command() -> list[str]:
    script = shutil.which("dataworth", path=os.path.dirname(sys.executable)) or shutil.which("dataworth")
    return [script] if script else [sys.executable, "-m", "flows.cli"]


def _write_tiny_corpus(root: Path, seed: int) -> tuple[Path, Path]:
    from dataworth.benchmarks.tiny_model import train_tokenizer

    texts = [f"document {i}: the value of key {i} is {i * 7 % 11}." for i in range(8)]
    tokenizer = train_tokenizer(texts * 4, vocab_size=300)
    model = random_causal_lm("gpt2", 2, 16, 2, len(tokenizer), 64, seed=seed)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return root / "model", docs


@task(name="measure_startup", cache_policy=NO_CACHE)
def measure_startup(workspace: str, tracking: list[str], seed: int = 0) -> StartupMeasured:
    """Run `dataworth index` and `dataworth query` on a tiny corpus as subprocesses and time them whole:
    with so little work, their wall time is the start-up (imports, the Prefect API, MLflow)."""
    root = Path(workspace, "startup").absolute()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    model, docs = _write_tiny_corpus(root, seed)
    index = root / "index"
    runs = {
        "index": [
            "index",
            *("--model", str(model), "--dataset", str(docs), "--id-column", "id", "--index", str(index)),
            *("--max-length", "16", "--proj-dim", "4", "--precondition", "none", "--batch-size", "4"),
            *("--shard-size", "4", "--overwrite"),
        ],
        "query": ["query", "--index", str(index), "--prompt", "document 3: the value", "--max-new-tokens", "2"],
    }
    seconds = {}
    # Each command in its own process (a `dataworth serve` the user may have running is not used), then the same
    # commands run by a service started here (its start-up paid once, before them).
    alone = {**os.environ, "DATAWORTH_SERVICE": "0"}
    via = {**os.environ, "DATAWORTH_HOME": str(root / "service-home")}
    via.pop("DATAWORTH_SERVICE", None)
    for name, args in runs.items():
        seconds[name] = _time_command(args + [*tracking, "--no-progress"], root, alone, name)
    start = time.perf_counter()
    with open(root / "serve.log", "w") as log:
        service = subprocess.Popen(
            [*_dataworth_command(), "serve"], cwd=root, env=via, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        while not (root / "service-home" / "service.json").exists():
            if service.poll() is not None or time.perf_counter() - start > 600:
                raise RuntimeError(f"`dataworth serve` did not start: {(root / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.05)
        seconds["ready"] = time.perf_counter() - start
        for name, args in runs.items():
            try:
                seconds[f"service_{name}"] = _time_command(
                    args + [*tracking, "--no-progress"], root, via, name, served=True
                )
            except RuntimeError as err:
                state = "running" if service.poll() is None else f"exited {service.returncode}"
                log = (root / "serve.log").read_text()[-3000:]
                raise RuntimeError(f"{err}\n`dataworth serve` ({state}) printed:\n{log}") from None
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(60)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
    return StartupMeasured(
        index_seconds=seconds["index"],
        query_seconds=seconds["query"],
        service_index_seconds=seconds["service_index"],
        service_query_seconds=seconds["service_query"],
        service_ready_seconds=seconds["ready"],
    )


def _time_command(args: list[str], cwd: Path, env: dict, name: str, served: bool = False) -> float:
    start = time.perf_counter()
    out = subprocess.run([*_dataworth_command(), *args], capture_output=True, text=True, cwd=cwd, env=env)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"`dataworth {name}` failed (exit {out.returncode}): {out.stderr[-2000:]}")
    if served and "run by the dataworth service" not in out.stdout:
        why = [line for line in out.stderr.splitlines() if line.startswith(f"dataworth {name}:")]
        raise RuntimeError(f"`dataworth {name}` did not run in the service started for it: {why or out.stderr[-2000:]}")
    return seconds
