"""Query stages: score queries against a published index, render the report."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from prefect import get_run_logger, task
from pydantic import Field

from dataworth.attribution.curvature import Curvature
from dataworth.attribution.hybrid import (
    Ranking,
    ann_query_vectors,
    complete_ranking,
    linear_fusion,
    recall_at_k,
    reciprocal_rank_fusion,
    rerank,
)
from dataworth.attribution.scoring import Scorer, checkpoint_sum, merge_ranked, needs_norms
from dataworth.config import (
    ANN_MODES,
    LEXICAL_MODES,
    GenerationConfig,
    QuerySpec,
    ScoreConfig,
    gradient_modes,
    hybrid_parts,
)
from dataworth.errors import IndexMismatchError
from dataworth.evaluation.matrices import save_matrices
from dataworth.queries import EncodedQuery
from dataworth.reports.html import write_report
from dataworth.reports.query_report import render_query_report, token_splits_by_query
from storage import (
    IndexManifest,
    IndexStore,
    IndexStoreError,
    load_results,
    queries_table,
    results_store,
    scores_table,
    write_csv,
)
from storage.store import batch_buffer, example_id_filter

from .common import (
    CACHE,
    IO_RETRIES,
    PERSIST,
    REBUILD,
    StageResult,
    index_curvature,
    index_norms,
    index_query_gradients,
    index_task_mix,
    norms_key,
    on_compute_thread,
    open_index_model,
    prefetched,
    read_array,
    stored_norms,
    write_array,
)


def score_run_id(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=lambda o: o.model_dump(mode="json"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def scoring_run_id(
    manifest: IndexManifest,
    queries: list[QuerySpec],
    score: ScoreConfig,
    generation: GenerationConfig,
    checkpoints: list[tuple[str, IndexManifest]] | None = None,
    checkpoint_weights: list[float] | None = None,
) -> str:
    """Run id of one scoring: the same whether it ran as one task or in shard ranges (shards_per_task is left out),
    whether or not its top scores are split token-wise afterwards (tokenwise_top: the scores are the same), and
    whether or not the vector index was prewarmed (ann_prewarm).

    The whole manifest (it carries published_at): table versions alone restart after an overwrite. A checkpoint
    sum adds its indexes' manifests and weights (a run without them keeps the id it always had)."""
    left_out = {"shards_per_task", "tokenwise_top", "ann_prewarm"}
    parts = [manifest, queries, score.model_dump(mode="json", exclude=left_out), generation]
    if checkpoints:
        parts += [[m for _uri, m in checkpoints], checkpoint_weights]
    return score_run_id(*parts)


@task(name="check_checkpoint_indexes")
def check_checkpoint_indexes(index_uri: str, manifest: IndexManifest, checkpoints: list[tuple[str, IndexManifest]]):
    """Refuse, before any model work, checkpoint indexes that do not hold the queried index's examples in the
    same shards (another corpus, another chunking or shard_size): their scores could not be summed."""
    for uri, other in checkpoints:
        fix = "build every checkpoint's index with the same data config and shard_size (`dataworth index`)"
        if other.data_fingerprint != manifest.data_fingerprint:
            raise IndexMismatchError(
                f"checkpoint index {uri!r} was built from other data than {index_uri!r} (data fingerprint "
                f"{other.data_fingerprint} against {manifest.data_fingerprint})",
                fix=fix,
            )
        if (other.num_examples, other.config.logging.shard_size) != (
            manifest.num_examples,
            manifest.config.logging.shard_size,
        ):
            raise IndexMismatchError(
                f"checkpoint index {uri!r} has {other.num_examples} examples in shards of "
                f"{other.config.logging.shard_size}, {index_uri!r} {manifest.num_examples} in shards of "
                f"{manifest.config.logging.shard_size}",
                fix=fix,
            )


def _score_checkpoints(
    scorer: Scorer, store: IndexStore, manifest: IndexManifest, others: list, score: ScoreConfig, weights: list[float]
) -> None:
    """The checkpoint sum of every streamed mode, kept by `scorer` (this index's). Each index's scan order is its
    own (shards are committed as they finish), so the indexes are read a few shards at a time, the same shards from
    each (a bitmap-indexed filter), and summed shard by shard: each shard's rows in id order, the same ids in every
    index (checked), memory that of those few shards."""
    scorers = [scorer] + [
        Scorer(grads, curv, streamed_modes(score), 1, norms=norms, task_mix=index_task_mix(score, m))
        for _store, m, grads, curv, norms in others
    ]
    sources = [(store, manifest)] + [(o_store, m) for o_store, m, *_ in others]
    shard_size = manifest.config.logging.shard_size
    seen = 0

    def read(source: tuple[IndexStore, IndexManifest], chunk: list[int]) -> list:
        """One index's batches of these shards, put in shard order (a batch is of one shard)."""
        s, m = source
        by_shard: dict[int, list] = {}
        for batch in shard_batches(s, score.train_batch_size, shard_size, m.gradients_version, chunk):
            by_shard.setdefault(int(batch[0][0]) // shard_size, []).append(batch)
        return [b for shard in sorted(by_shard) for b in by_shard[shard]]

    # Every index's shards of a chunk are read at the same time, each on its own thread (Lance's reads release the
    # GIL), and the next chunk's while this one is summed: read one index after the other, with nothing overlapped,
    # the reads took most of a small corpus's scoring time. Two chunks of every index are held at most.
    chunks = manifest.shard_ranges(max(1, score.train_batch_size // shard_size))
    with ThreadPoolExecutor(len(sources), thread_name_prefix="dataworth-checkpoint-read") as pool:

        def submit(chunk: list[int]) -> list:
            return [pool.submit(read, source, chunk) for source in sources]

        pending = submit(chunks[0]) if chunks else []
        for i, chunk in enumerate(chunks):
            parts = [f.result() for f in pending]
            pending = submit(chunks[i + 1]) if i + 1 < len(chunks) else []
            _sum_chunk(scorer, scorers, sources, parts, chunk, weights)
            seen += sum(len(b[0]) for b in parts[0])
    if seen != manifest.num_examples:
        raise IndexMismatchError(f"the checkpoint sum read {seen} examples, the index has {manifest.num_examples}")


def _sum_chunk(scorer: Scorer, scorers: list[Scorer], sources: list, parts: list, chunk: list[int], weights) -> None:
    """Check that every index holds the same example ids in these shards, then keep their weighted sum."""
    for (s, _m), got in zip(sources[1:], parts[1:]):
        if len(got) != len(parts[0]) or any(not torch.equal(mine[0], theirs[0]) for mine, theirs in zip(parts[0], got)):
            raise IndexMismatchError(
                f"checkpoint index {s.uri!r} holds other examples in shards {chunk[0]}-{chunk[-1]} than the "
                "index being queried",
                fix="build every checkpoint's index from the same data with the same shard_size",
            )
    for batches in zip(*parts):
        ids = batches[0][0]
        scorer.keep(ids, checkpoint_sum(scorers, weights, ids, [b[1] for b in batches]))


def shard_batches(
    store: IndexStore,
    batch_size: int,
    shard_size: int,
    version: int | None = None,
    shards: list[int] | None = None,
    keep: np.ndarray | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(example ids, vectors float32) of the stored gradients (of `shards`, else all), one shard at a time: a shard's
    rows sorted by id, in pieces of at most batch_size; read one batch ahead of the caller.

    A batch's contents then depend on its shard alone, not on which other shards one scan reads nor in what order,
    so every score is the same bits whether the index is scored by one task or in shard ranges (a matmul's result
    for one pair depends on the batch it is computed in). A shard's rows are contiguous in a scan (each shard is
    written by one commit); a shard that were not would be scored in more pieces, with the same scores to rounding.

    `keep` (sorted example ids, a metadata filter's) restricts the scan to those rows: only the shards holding them
    are read (the shard column's bitmap index), and within them an example_id filter is pushed into Lance, which
    then reads the vectors of the matching rows only.
    """
    where = None
    if keep is not None:
        held = np.unique(keep // shard_size)
        shards = held.tolist() if shards is None else sorted(set(shards) & set(held.tolist()))
        if not shards:
            return iter(())
        where = example_id_filter(keep)
    # depth=1, as gradient_batches: each batch more read ahead is one batch more in memory, at no measured gain.
    pieces = store.iter_gradient_pieces(batch_size, version=version, shards=shards, where=where)
    return prefetched(_shard_tensors(pieces, batch_size, shard_size), depth=1)


def _shard_tensors(
    batches: Iterable[list[tuple[np.ndarray, ...]]], batch_size: int, shard_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # A shard's rows are held as the scanner's own read-only views (no copy) until the shard ends; each batch of
    # the shard in id order is then one copy into Arrow's memory pool (batch_buffer), as gradient_batches does:
    # merged and reordered numpy copies came from glibc, whose per-thread arenas kept them, and a scoring pass's
    # resident memory grew with the table.
    held: list[tuple[np.ndarray, np.ndarray]] = []
    current = None
    for pieces in batches:
        for ids, vectors, _sq in pieces:
            keys = ids // shard_size
            cuts = np.flatnonzero(np.diff(keys)) + 1
            for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(ids)]):
                if keys[lo] != current and held:
                    yield from _sorted_batches(held, batch_size)
                    held = []
                current = keys[lo]
                held.append((ids[lo:hi], vectors[lo:hi]))
    if held:
        yield from _sorted_batches(held, batch_size)


def _sorted_batches(
    held: list[tuple[np.ndarray, np.ndarray]], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The rows of `held` (views laid end to end) sorted by id (stable), in batches of batch_size, each copied
    from the views into its own batch_buffer: one copy per source view a batch draws on while the rows are
    already in id order (as log_gradients writes a shard), an index gather per view otherwise."""
    ids = np.concatenate([i for i, _ in held])
    order = np.argsort(ids, kind="stable")
    starts = np.cumsum([0] + [len(i) for i, _ in held])
    # from_dlpack takes the read-only views without from_numpy's warning; they are only read.
    sources = [torch.from_dlpack(v) for _, v in held]
    dim = held[0][1].shape[1]
    for lo in range(0, len(ids), batch_size):
        take = order[lo : lo + batch_size]  # rows of the shard, in the batch's order
        vectors = torch.from_numpy(batch_buffer(len(take), dim))
        piece = np.searchsorted(starts, take, side="right") - 1
        by_piece = np.argsort(piece, kind="stable")  # the batch's positions grouped by source view
        for dest in np.split(by_piece, np.flatnonzero(np.diff(piece[by_piece])) + 1):
            k = piece[dest[0]]
            rows = take[dest] - starts[k]
            first, n = int(dest[0]), len(dest)
            if int(dest[-1]) - first == n - 1 and (n == 1 or bool((np.diff(rows) == 1).all())):
                vectors[first : first + n].copy_(sources[k][int(rows[0]) : int(rows[0]) + n])
            else:
                vectors.index_copy_(0, torch.from_numpy(dest), sources[k].index_select(0, torch.from_numpy(rows)))
        yield torch.from_numpy(ids[take]), vectors


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of the union of per-range top-k lists: (ids [Q, k_i], scores [Q, k_i]) each, best first.

    The rule of dataworth.attribution.scoring.TopK: higher score first, equal scores by the smaller id. Every
    example of the global top-k is in its own range's top-k, so the merge equals one pass over all shards."""
    ids = torch.cat([torch.as_tensor(np.asarray(i), dtype=torch.long) for i, _ in parts], dim=1)
    scores = torch.cat([torch.as_tensor(np.asarray(s), dtype=torch.float64) for _, s in parts], dim=1)
    scores, ids = merge_ranked(scores, ids, k)
    return ids.numpy(), scores.numpy()


# Queries whose rerank candidates are read and scored together: their rows are held at once (float64).
_RERANK_QUERIES = 64


def streamed_modes(score: ScoreConfig) -> list[str]:
    """The gradient modes the streaming pass computes: those asked for, and those a hybrid-rrf mode fuses."""
    return gradient_modes(score.modes)


def streamed_depth(score: ScoreConfig) -> int:
    """How deep the streaming pass keeps each gradient ranking: top_k, or `candidates` when a hybrid-rrf mode fuses
    it (the first top_k of an exact top-M are the exact top-k)."""
    rrf = any((hybrid_parts(m) or ("",))[0] == "rrf" for m in score.modes)
    return max(score.top_k, score.candidates) if rrf else score.top_k


def _needs_norms(score: ScoreConfig) -> bool:
    return needs_norms(gradient_modes(score.modes, kinds=("rrf", "rerank", "linear", "ann")))


def _text_modes(modes: list[str]) -> list[str]:
    """The modes that search the full-text index: bm25 and the hybrid-rrf/rerank ones."""
    return [m for m in modes if m in LEXICAL_MODES or (hybrid_parts(m) and m not in ANN_MODES)]


def check_text_index(store: IndexStore, manifest: IndexManifest, score: ScoreConfig) -> None:
    """bm25 and the hybrid modes search the index's full-text index, hybrid-ann-* its vector index: an index built
    without the one a mode needs is said before any model work."""
    try:
        if _text_modes(score.modes):
            store.check_text_index(manifest.examples_version)
        if any(m in ANN_MODES for m in score.modes):
            store.check_vector_index(manifest.gradients_version)
    except IndexStoreError as exc:
        raise ValueError(str(exc)) from None  # bad input: never retried


def filter_ids(store: IndexStore, manifest: IndexManifest, score: ScoreConfig) -> np.ndarray | None:
    """The sorted example ids score.where_source / where_document keep (None: no filter), read from the examples
    table the manifest pins; a filter that keeps nothing is an error, said before any model work."""
    if not score.filtered:
        return None
    keep = store.example_ids_where(manifest.examples_version, score.where_source, score.where_document)
    if not len(keep):
        given = {"where_source": score.where_source, "where_document": score.where_document}
        shown = ", ".join(f"{k}={v}" for k, v in given.items() if v is not None)
        raise ValueError(
            f"no example of the index matches {shown}: give values the examples table holds (source comes from "
            "the index's data.source_column, document_id from data.id_column or the row number)"
        )
    return keep


def _rows(rankings: list[Ranking], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [Q, k], scores [Q, k]) of per-query rankings, each cut at k."""
    return np.stack([r[0][:k] for r in rankings]), np.stack([r[1][:k] for r in rankings])


def _matrix_row(n: int, ranking: Ranking, fill: float) -> np.ndarray:
    row = np.full(n, fill)
    row[ranking[0]] = ranking[1]
    return row


def lexical_and_hybrid(
    store: IndexStore,
    manifest: IndexManifest,
    encoded: list[EncodedQuery],
    q_grads: torch.Tensor,
    curvature: Curvature,
    norms: torch.Tensor | None,
    score: ScoreConfig,
    streamed: dict[str, tuple[np.ndarray, np.ndarray]],
    full: bool = False,
    keep: np.ndarray | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """The top-k of bm25 and the hybrid modes (mode → (ids, scores), each [queries, k]), and with `full` their
    full score matrices [queries, examples].

    BM25 scores each query's prompt + completion from the index's full-text index (a full matrix holds 0 where an
    example shares no word with the query). hybrid-rrf-<g>: RRF of BM25's ranking and the streamed ranking of g
    (`streamed[g]`, ids and scores [queries, ≥ candidates]), both cut at `candidates` (0 for an example in
    neither). hybrid-rerank-<g>: BM25's top `candidates` ranked by their exact scores in g, read from the
    gradients table by id (a full matrix holds NaN, not scored, elsewhere). hybrid-linear-<g>: the same candidates
    scored by linear_fusion of their BM25 and exact g scores (NaN elsewhere). hybrid-ann-<g>: the vector index's
    `candidates` nearest rows to g's ANN query vector (ann_query_vectors), reranked the same way. `norms` (by
    example id) are needed by a rerank in relatif or cosine. `keep` (sorted example ids of a metadata filter)
    restricts every search to those examples."""
    modes = [m for m in score.modes if m in LEXICAL_MODES or hybrid_parts(m)]
    if not modes:
        return {}, {}
    n = manifest.num_examples if keep is None else len(keep)
    m_cut, k = score.candidates, min(score.top_k, n)
    where = None if keep is None else example_id_filter(keep)
    hybrid = [m for m in modes if hybrid_parts(m)]
    task_mix = index_task_mix(score, manifest)
    # trackstar's curvature is the whole query set's, not that of each part reranked or searched
    task = curvature.mixed(q_grads, task_mix) if any(m.endswith("-trackstar") for m in hybrid) else None
    rankings: dict[str, list[Ranking]] = {}
    fills = {"bm25": 0.0}
    candidates: list[np.ndarray] = []
    if _text_modes(modes):
        depth = n if full else max(score.top_k, score.candidates if hybrid else 0)
        texts = [q.prompt + q.completion for q in encoded]
        hits = store.search_text(texts, depth, manifest.examples_version, where)
        bm25 = [complete_ranking(ids, scores, manifest.num_examples, depth, keep) for ids, scores in hits]
        if "bm25" in modes:
            rankings["bm25"] = bm25
        candidates = [ids[:m_cut] for ids, _ in bm25]
    reranks = list(dict.fromkeys(g for kind, g in map(hybrid_parts, hybrid) if kind in ("rerank", "linear")))
    reranked = _rerank(store, manifest, q_grads, curvature, reranks, candidates, norms, task) if reranks else {}
    for mode in hybrid:
        kind, gradient = hybrid_parts(mode)
        if kind == "rrf":
            ids = streamed[gradient][0]
            rankings[mode] = [
                reciprocal_rank_fusion([c, ids[q][:m_cut]], score.rrf_k) for q, c in enumerate(candidates)
            ]
            fills[mode] = 0.0
        elif kind == "linear":  # BM25's candidates, their BM25 and exact gradient scores combined
            rankings[mode] = [
                linear_fusion((ids[:m_cut], scores[:m_cut]), exact, score.linear_weight)
                for (ids, scores), exact in zip(bm25, reranked[gradient], strict=True)
            ]
            fills[mode] = np.nan
        elif kind == "ann":  # the ANN candidates' rows read by id and reranked, as BM25's are
            vectors = ann_query_vectors(q_grads, curvature, gradient, task)
            found, rows = _ann_candidates(store, manifest, vectors, score, n, where, keep)
            rankings[mode] = _rerank(store, manifest, q_grads, curvature, [gradient], found, norms, task, rows)[
                gradient
            ]
            fills[mode] = np.nan
        else:
            rankings[mode], fills[mode] = reranked[gradient], np.nan
    topk = {mode: _rows(r, k) for mode, r in rankings.items()}
    matrices = (
        {mode: np.stack([_matrix_row(n, x, fills[mode]) for x in r]) for mode, r in rankings.items()} if full else {}
    )
    return topk, matrices


def _rerank(
    store: IndexStore,
    manifest: IndexManifest,
    q_grads: torch.Tensor,
    curvature: Curvature,
    modes: list[str],
    candidates: list[np.ndarray],
    norms: torch.Tensor | None,
    task: Curvature | None,
    row_ids: list[np.ndarray] | None = None,
) -> dict[str, list[Ranking]]:
    """Each query's candidates ranked by their exact scores in each gradient mode: only the candidates' rows are
    read (once for every mode; by their Lance row ids when the search gave them, `row_ids` beside `candidates`,
    else by example id), _RERANK_QUERIES queries at a time. `task` is trackstar's curvature (Curvature.mixed of
    the whole query set)."""
    out: dict[str, list[Ranking]] = {m: [] for m in modes}
    version = manifest.gradients_version
    for lo in range(0, len(candidates), _RERANK_QUERIES):
        part = candidates[lo : lo + _RERANK_QUERIES]
        if row_ids is None:
            ids = np.unique(np.concatenate(part))
            vectors, _ = store.read_gradients_by_id(ids, version)
        else:
            ids, vectors = store.read_candidate_rows(part, row_ids[lo : lo + _RERANK_QUERIES], version)
        rows_norms = None if norms is None else norms[torch.from_numpy(ids)]
        queries = q_grads[lo : lo + _RERANK_QUERIES]
        for mode in modes:
            out[mode] += rerank(queries, curvature, mode, part, ids, torch.from_numpy(vectors), rows_norms, task)
    return out


def prewarm_ann(store: IndexStore, manifest: IndexManifest, score: ScoreConfig) -> Callable[[], None]:
    """Start loading the index's vector index into memory in a background thread when a hybrid-ann mode will
    search it (score.ann_prewarm); returns the function that waits for it. A failed prewarm is logged as a warning,
    not raised: the search then reads its partitions itself."""
    if not score.ann_prewarm or not any(m in ANN_MODES for m in score.modes):
        return lambda: None
    log, outcome = get_run_logger(), {}

    def load() -> None:
        try:
            outcome["seconds"] = store.prewarm_vector_index(manifest.gradients_version)
        except Exception as err:  # noqa: BLE001 - reported by wait(); the search works without it
            outcome["error"] = err

    thread = threading.Thread(target=load, name="ann-prewarm", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if "error" in outcome:
            log.warning("the vector index was not prewarmed (%s); the search reads its partitions", outcome["error"])
        else:
            log.info("vector index prewarmed in %.2f s", outcome["seconds"])

    return wait


def _ann_candidates(
    store: IndexStore,
    manifest: IndexManifest,
    vectors: torch.Tensor,
    score: ScoreConfig,
    available: int,
    where,
    keep: np.ndarray | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each query's `candidates` example ids from the vector index (of the `available` rows a filter keeps), and
    their Lance row ids beside them; one search for all queries. IVF reads only `ann_nprobes` partitions, which
    may hold fewer rows than asked for (a small or filtered index): such a query is searched again through every
    partition, and one still short (a quantized search can drop rows a filter keeps) by an exact flat scan of the
    rows that match, so each query gets min(candidates, available) candidates. With a filter, ids outside `keep`
    are dropped first: IVF_RQ's prefiltered search was seen to return some (tests/tasks/test_ann_filter_query.py,
    about 1 run in 3)."""
    want, version = min(score.candidates, available), manifest.gradients_version
    every = int((manifest.ann_index or {}).get("partitions") or score.ann_nprobes)

    def search(which: list[int] | None, nprobes: int, refine: int | None, exact: bool = False) -> None:
        part = vectors if which is None else vectors[which]
        ids, rows = store.search_vector_rows(part.numpy(), want, version, nprobes, refine, where, exact)
        for q, i, r in zip(range(len(ids)) if which is None else which, ids, rows, strict=True):
            kept = slice(None) if keep is None or exact else np.isin(i, keep)
            found[q], row_ids[q] = i[kept], r[kept]

    found: list[np.ndarray] = [np.empty(0, np.int64)] * len(vectors)
    row_ids: list[np.ndarray] = [np.empty(0, np.uint64)] * len(vectors)
    search(None, score.ann_nprobes, score.ann_refine_factor)
    short = [q for q, ids in enumerate(found) if len(ids) < want]
    if short and every > score.ann_nprobes:
        search(short, every, score.ann_refine_factor)
    short = [q for q, ids in enumerate(found) if len(ids) < want]
    if short:
        search(short, every, None, exact=True)
    return found, row_ids


def ann_recall(score: ScoreConfig, streamed: dict, searched: dict) -> dict[str, float]:
    """recall@top_k of each hybrid-ann-<g> mode against g's exact top-k, where this run streamed g too."""
    out = {}
    for mode in score.modes:
        if mode in ANN_MODES and hybrid_parts(mode)[1] in streamed:
            exact = streamed[hybrid_parts(mode)[1]][0]
            out[mode] = recall_at_k(searched[mode][0], exact, score.top_k)
    return out


def _asked(score: ScoreConfig, *parts: dict) -> dict:
    """The entries of the modes asked for, in the order asked (a hybrid-rrf mode streams a gradient mode that may
    not be one of them)."""
    merged = {k: v for part in parts for k, v in part.items()}
    return {m: merged[m] for m in score.modes}


def _topk(score: ScoreConfig, streamed: dict, searched: dict) -> dict:
    """The top-k of every mode asked for: the streamed rankings (kept `streamed_depth` deep) cut at top_k, and those
    of bm25 and the hybrid modes."""
    k = score.top_k
    return _asked(score, {m: (ids[:, :k], s[:, :k]) for m, (ids, s) in streamed.items()}, searched)


class Scored(StageResult):
    """One scoring run written to the scores and queries tables by score_queries."""

    score_run_id: str = Field(description="Run id of the stored scores and queries rows.")
    queries: int = Field(description="Queries scored.")
    pairs: int = Field(description="Query × training example pairs scored (over all modes).")
    pairs_per_s: float = Field(description="Scoring throughput, pairs per second.")
    query_gradient_seconds: float = Field(description="Time to encode the queries and take their gradients.")
    score_seconds: float = Field(description="Time of the streaming pass over the stored gradients.")
    search_seconds: float = Field(
        0.0, description="Time of bm25 and the hybrid modes: the full-text searches, fusions and reranks."
    )
    top_k: int = Field(10, description="Examples kept per query and mode (the k of ann_recall).")
    ann_recall: dict[str, float] = Field(
        default_factory=dict,
        description="hybrid-ann mode → recall@top_k against its gradient mode's exact top-k, for the ANN modes whose "
        "gradient mode the run streamed too.",
    )
    examples_scored: int | None = Field(None, description="Examples a metadata filter kept (None: no filter).")

    @property
    def compute_seconds(self) -> float:
        return self.query_gradient_seconds + self.score_seconds + self.search_seconds

    def metrics(self) -> dict[str, float]:
        return {
            "queries": self.queries,
            "query_gradient_seconds": self.query_gradient_seconds,
            "score_seconds": self.score_seconds,
            "score_pairs_per_s": self.pairs_per_s,
            "score_pairs": self.pairs,
            **({"search_seconds": self.search_seconds} if self.search_seconds else {}),
            **{f"recall_at_{self.top_k}.{mode}": r for mode, r in self.ann_recall.items()},
            **({} if self.examples_scored is None else {"examples_scored": self.examples_scored}),
        }


class Report(StageResult):
    """The files render_report wrote."""

    report: str = Field(description="Path of the HTML report.")
    topk_csv: str | None = Field(description="Path of the top-k CSV; None when no scores were stored.")
    tokens_csv: str | None = Field(
        None, description="Path of the token-wise scores' CSV; None when the run's scores were not split."
    )

    @property
    def files(self) -> list[str]:
        """Files to keep as MLflow artifacts."""
        return [p for p in (self.report, self.topk_csv, self.tokens_csv) if p]


def _query_side(
    store: IndexStore,
    manifest: IndexManifest,
    queries: list[QuerySpec],
    score: ScoreConfig,
    generation: GenerationConfig,
    results: IndexStore,
) -> tuple[list[EncodedQuery], torch.Tensor, float, Curvature, torch.Tensor | None]:
    """(encoded queries, their gradients, seconds taken, the damped curvature, the stored norms ‖(F+λI)^-½ g_i‖
    when a mode needs them). The norms are stored by fit_curvature for the index's damping; another damping
    computes and stores its own once."""
    start = time.perf_counter()
    index = open_index_model(store, manifest)
    encoded, q_grads = index_query_gradients(index, queries, generation, score.query_batch_size)
    seconds = time.perf_counter() - start
    curvature = index_curvature(store, manifest, score.damping_factor)
    norms = index_norms(store, manifest, curvature, score.train_batch_size, results) if _needs_norms(score) else None
    return encoded, q_grads, seconds, curvature, norms


@task(name="score_queries", cache_policy=CACHE, **PERSIST, tags=["gpu"], **IO_RETRIES)
@on_compute_thread
def score_queries(
    index_uri: str,
    manifest: IndexManifest,
    queries: list[QuerySpec],
    score: ScoreConfig,
    generation: GenerationConfig,
    full_matrix_path: str | None = None,
    model_fingerprint: str | None = None,
    results_uri: str | None = None,
    checkpoints: list[tuple[str, IndexManifest]] | None = None,
    checkpoint_weights: list[float] | None = None,
) -> Scored:
    """Query gradients (generating missing completions), then every gradient mode over one streaming pass, then
    bm25 and the hybrid modes (full-text searches of the index, fusions, reranks of the candidates' rows).

    `model_fingerprint` (the index model's, as checked by the caller) is part of the cache key only. Scores and
    queries go to the results store (results_uri, default the index's results/ folder), never into the index.

    `checkpoints` are (URI, manifest) of the same corpus's indexes under other checkpoints (checked by the caller,
    `check_checkpoint_indexes`): each takes the queries' gradients with its own model, for the completions the
    index's model gave, and every gradient mode is Σ_c w_c score_c (`checkpoint_weights`, this index's first),
    read in lockstep from all the indexes."""
    log = get_run_logger()
    store, results = IndexStore(index_uri), results_store(index_uri, results_uri)
    check_text_index(store, manifest, score)  # before any model work; checkpoint indexes are never searched
    keep = filter_ids(store, manifest, score)
    prewarmed = prewarm_ann(store, manifest, score)  # in the background, while the query gradients are taken
    encoded, q_grads, query_seconds, curvature, norms = _query_side(
        store, manifest, queries, score, generation, results
    )
    others = []
    if checkpoints:
        # The same completions at every checkpoint: the ones the index's own model was asked to attribute.
        fixed = [QuerySpec(id=q.id, prompt=q.prompt, completion=q.completion) for q in encoded]
        for uri, other in checkpoints:
            o_store = IndexStore(uri)
            _enc, o_grads, o_seconds, o_curv, o_norms = _query_side(
                o_store, other, fixed, score, generation, results_store(uri, None)
            )
            others.append((o_store, other, o_grads, o_curv, o_norms))
            query_seconds += o_seconds

    version = manifest.gradients_version
    n_train = manifest.num_examples
    full = full_matrix_path is not None
    streamed, matrices, pairs = {}, {}, 0
    start = time.perf_counter()
    if streamed_modes(score):
        scorer = Scorer(
            q_grads,
            curvature,
            streamed_modes(score),
            streamed_depth(score),
            n_train if full else None,
            norms=norms,
            task_mix=index_task_mix(score, manifest),
        )
        if not others:
            shard_size = manifest.config.logging.shard_size
            batches = shard_batches(store, score.train_batch_size, shard_size, version, keep=keep)
            for ids, vectors in batches:  # the next batch is read meanwhile
                scorer.update(ids, vectors)
        else:
            weights = checkpoint_weights or [1.0] * (1 + len(others))
            _score_checkpoints(scorer, store, manifest, others, score, weights)
        streamed = {mode: (top.ids.numpy(), top.scores.numpy()) for mode, top in scorer.topk.items()}
        matrices = {m: v.numpy() for m, v in scorer.full.items()} if full else {}
        pairs = scorer.pairs
    score_seconds = time.perf_counter() - start
    prewarmed()
    searched, searched_full = lexical_and_hybrid(
        store, manifest, encoded, q_grads, curvature, norms, score, streamed, full, keep
    )
    search_seconds = time.perf_counter() - start - score_seconds

    srid = scoring_run_id(manifest, queries, score, generation, checkpoints, checkpoint_weights)
    query_ids = [q.id for q in encoded]
    topk = _topk(score, streamed, searched)
    results.write_scores(srid, scores_table(srid, query_ids, topk, version))
    results.write_queries(srid, queries_table(srid, encoded))
    if full_matrix_path:
        save_matrices(full_matrix_path, _asked(score, matrices, searched_full), query_ids)
    pairs_per_s = pairs / max(score_seconds, 1e-9)
    log.info(
        "scored %d queries × %d examples × %d modes (%.0f pairs/s)",
        len(encoded),
        n_train,
        len(score.modes),
        pairs_per_s,
    )
    return Scored(
        score_run_id=srid,
        queries=len(encoded),
        pairs=pairs,
        pairs_per_s=pairs_per_s,
        query_gradient_seconds=query_seconds,
        score_seconds=score_seconds,
        search_seconds=search_seconds if searched else 0.0,
        top_k=score.top_k,
        ann_recall=ann_recall(score, streamed, searched),
        examples_scored=None if keep is None else len(keep),
    )


class QueryGradients(StageResult):
    """The query side of a sharded scoring run, computed once by query_gradients: the encoded queries, and where
    their gradients are stored (an artifact of the index, so that every shard-range task reads the same ones)."""

    score_run_id: str = Field(description="Run id of the scores and queries rows this scoring will write.")
    artifact: str = Field(description="Artifact key of the query gradients [queries, dim] (a .npy blob).")
    encoded: list[EncodedQuery] = Field(description="The queries as attributed (generated completions included).")
    seconds: float = Field(description="Time to encode the queries and take their gradients.")

    def metrics(self) -> dict[str, float]:
        return {"queries": len(self.encoded), "query_gradient_seconds": self.seconds}


class RangeScores(StageResult):
    """One shard range's per-mode top-k (and its columns of the full matrix when asked for)."""

    shards: list[int] = Field(description="Gradient shards scored.")
    topk: dict[str, tuple[list[list[int]], list[list[float]]]] = Field(
        description="mode → (example ids, scores), each [queries, ≤ top_k], best first."
    )
    rows: int = Field(description="Stored gradients scored.")
    pairs: int = Field(description="Query × training example pairs scored (over all modes).")
    seconds: float = Field(description="Time of the streaming pass over the range.")
    full_ids: list[int] | None = Field(None, description="Example ids of the full-matrix columns (full_matrix only).")
    full: dict[str, list[list[float]]] | None = Field(None, description="mode → [queries, len(full_ids)] scores.")

    def metrics(self) -> dict[str, float]:
        return {"range_score_seconds": self.seconds, "range_score_pairs": self.pairs}


@task(name="query_gradients", cache_policy=CACHE, **PERSIST, tags=["gpu"], **IO_RETRIES)
@on_compute_thread
def query_gradients(
    index_uri: str,
    manifest: IndexManifest,
    queries: list[QuerySpec],
    score: ScoreConfig,
    generation: GenerationConfig,
    model_fingerprint: str | None = None,
    results_uri: str | None = None,
) -> QueryGradients:
    """Query gradients (generating missing completions), stored with the index for the shard-range tasks; the
    stored norms ‖(F+λI)^-½ g_i‖ of this damping are made sure of here, once, not by every range.
    `model_fingerprint` (the index model's, as checked by the caller) is part of the cache key only."""
    store, results = IndexStore(index_uri), results_store(index_uri, results_uri)
    check_text_index(store, manifest, score)
    filter_ids(store, manifest, score)  # a filter that keeps nothing is said before any model work
    encoded, q_grads, seconds, _curvature, _norms = _query_side(store, manifest, queries, score, generation, results)
    srid = scoring_run_id(manifest, queries, score, generation)
    key = f"query-gradients-{srid}"
    write_array(results, key, q_grads.numpy())
    return QueryGradients(score_run_id=srid, artifact=key, encoded=encoded, seconds=seconds)


def _stored_norms(
    index_uri: str, store: IndexStore, manifest: IndexManifest, curvature: Curvature, score: ScoreConfig, results
) -> torch.Tensor | None:
    """The norms ‖(F+λI)^-½ g_i‖ that query_gradients made sure of, when a mode needs them."""
    if not _needs_norms(score):
        return None
    stored = stored_norms(store, manifest, norms_key(manifest.curvature_artifact, curvature), results)
    if stored is None:
        raise ValueError(f"index {index_uri!r} lacks the stored norms of this damping; {REBUILD}")
    return torch.from_numpy(stored)


def _query_grads(index_uri: str, results: IndexStore, query: QueryGradients) -> torch.Tensor:
    stored_grads = read_array(results, query.artifact)
    if stored_grads is None:
        raise ValueError(f"index {index_uri!r} has no query gradients {query.artifact!r}; score the queries again")
    return torch.from_numpy(stored_grads)


@task(name="score_shard_range", cache_policy=CACHE, **PERSIST, tags=["gpu"], **IO_RETRIES)
@on_compute_thread
def score_shard_range(
    index_uri: str,
    manifest: IndexManifest,
    query: QueryGradients,
    score: ScoreConfig,
    shards: list[int],
    full_matrix: bool = False,
    results_uri: str | None = None,
) -> RangeScores:
    """Every mode's top-k of the queries over the stored gradients of `shards` (one streaming pass)."""
    if not streamed_modes(score):  # bm25 and hybrid-rerank modes only: merge_scores searches, nothing is streamed
        return RangeScores(shards=list(shards), topk={}, rows=0, pairs=0, seconds=0.0)
    store, results = IndexStore(index_uri), results_store(index_uri, results_uri)
    q_grads = _query_grads(index_uri, results, query)
    curvature = index_curvature(store, manifest, score.damping_factor)
    norms = _stored_norms(index_uri, store, manifest, curvature, score, results)
    keep = filter_ids(store, manifest, score)
    scorer = Scorer(
        q_grads,
        curvature,
        streamed_modes(score),
        streamed_depth(score),
        manifest.num_examples if full_matrix else None,
        norms=norms,
        task_mix=index_task_mix(score, manifest),
    )
    batches = shard_batches(
        store, score.train_batch_size, manifest.config.logging.shard_size, manifest.gradients_version, shards, keep
    )
    seen: list[torch.Tensor] = []
    start = time.perf_counter()
    for ids, vectors in batches:
        scorer.update(ids, vectors)
        seen.append(ids)
    seconds = time.perf_counter() - start
    full_ids = torch.cat(seen) if seen else torch.empty(0, dtype=torch.long)
    full = None
    if scorer.full is not None:
        full = {m: v[:, full_ids].tolist() for m, v in scorer.full.items()}
    return RangeScores(
        shards=list(shards),
        topk={m: (t.ids.tolist(), t.scores.tolist()) for m, t in scorer.topk.items()},
        rows=int(full_ids.numel()),
        pairs=scorer.pairs,
        seconds=seconds,
        full_ids=full_ids.tolist() if full is not None else None,
        full=full,
    )


@task(name="merge_scores", cache_policy=CACHE, **PERSIST, **IO_RETRIES)
def merge_scores(
    index_uri: str,
    manifest: IndexManifest,
    query: QueryGradients,
    score: ScoreConfig,
    ranges: list[RangeScores],
    full_matrix_path: str | None = None,
    results_uri: str | None = None,
) -> Scored:
    """The exact top-k over every shard range (as one task over the whole index would give it), stored in the
    scores and queries tables; with full_matrix_path, the full score matrix assembled from the ranges."""
    log = get_run_logger()
    n_train = manifest.num_examples
    rows = sum(r.rows for r in ranges)
    n_queries = len(query.encoded)
    modes = streamed_modes(score)
    store = IndexStore(index_uri)
    keep = filter_ids(store, manifest, score)
    expected = n_train if keep is None else len(keep)
    if modes and rows != expected:
        raise ValueError(f"the shard ranges hold {rows} stored gradients, the index {expected}; {REBUILD}")
    empty = (np.empty((n_queries, 0), np.int64), np.empty((n_queries, 0)))
    streamed = {m: merge_topk([empty, *(r.topk[m] for r in ranges)], streamed_depth(score)) for m in modes}
    matrices = {}
    if full_matrix_path:
        matrices = {m: np.zeros((n_queries, n_train)) for m in modes}
        for r in ranges:
            for m in modes:
                matrices[m][:, r.full_ids] = np.asarray(r.full[m], dtype=np.float64).reshape(n_queries, -1)
    start = time.perf_counter()
    searched, searched_full = {}, {}
    results = results_store(index_uri, results_uri)
    if any(m not in modes for m in score.modes):  # bm25 and the hybrid modes, from the merged rankings
        curvature = index_curvature(store, manifest, score.damping_factor)
        norms = _stored_norms(index_uri, store, manifest, curvature, score, results)
        q_grads = _query_grads(index_uri, results, query)
        searched, searched_full = lexical_and_hybrid(
            store,
            manifest,
            query.encoded,
            q_grads,
            curvature,
            norms,
            score,
            streamed,
            full_matrix_path is not None,
            keep,
        )
    search_seconds = time.perf_counter() - start
    query_ids = [q.id for q in query.encoded]
    topk = _topk(score, streamed, searched)
    results.write_scores(
        query.score_run_id, scores_table(query.score_run_id, query_ids, topk, manifest.gradients_version)
    )
    results.write_queries(query.score_run_id, queries_table(query.score_run_id, query.encoded))
    if full_matrix_path:
        save_matrices(full_matrix_path, _asked(score, matrices, searched_full), query_ids)
    pairs = sum(r.pairs for r in ranges)
    seconds = sum(r.seconds for r in ranges)
    pairs_per_s = pairs / max(seconds, 1e-9)
    log.info(
        "scored %d queries × %d examples × %d modes in %d shard ranges (%.0f pairs/s per range)",
        n_queries,
        n_train,
        len(modes),
        len(ranges),
        pairs_per_s,
    )
    return Scored(
        score_run_id=query.score_run_id,
        queries=n_queries,
        pairs=pairs,
        pairs_per_s=pairs_per_s,
        query_gradient_seconds=query.seconds,
        score_seconds=seconds,
        search_seconds=search_seconds if searched else 0.0,
        top_k=score.top_k,
        ann_recall=ann_recall(score, streamed, searched),
        examples_scored=None if keep is None else len(keep),
    )


@task(name="render_report", **IO_RETRIES)
def render_report(
    index_uri: str,
    srid: str,
    report_dir: str,
    title: str,
    run_info: dict,
    relevant: dict[str, list[str]] | None = None,
    metrics: dict | None = None,
    results_uri: str | None = None,
    max_rows: int | None = 50,
    examples_version: int | None = None,
) -> Report:
    """HTML report and top-k CSV of one scoring run, saved under report_dir; the report lists the first
    `max_rows` results per query and mode (a large top-k stays a small page), the CSV all of them. Where the run's
    top scores were split token-wise (its rows in the results' token_scores table), each query gets its token heat
    map and the rows are written as tokens-<run id>.csv."""
    queries, results = load_results(index_uri, srid, results_uri, examples_version)
    token_rows = results_store(index_uri, results_uri).read_token_scores(srid).to_pylist()
    for by_query in results.values():
        for qid, rows in by_query.items():
            for row in rows:
                row["relevant"] = None if relevant is None else row["document_id"] in set(relevant.get(qid, []))
    samples = {m: [r["score"] for rows in bq.values() for r in rows] for m, bq in results.items()}
    queries = [
        {"id": q["query_id"], "prompt": q["prompt"], "completion": q["completion"], "generated": q["generated"]}
        for q in queries
    ]
    out = Path(report_dir)
    csv_path = out / f"topk-{srid}.csv"
    splits = token_splits_by_query(token_rows) if token_rows else None
    html = render_query_report(
        title, queries, results, metrics, run_info, samples, max_rows, csv_path.name, token_scores=splits
    )
    path = write_report(html, out / f"report-{srid}.html")
    tokens_csv = None
    if token_rows:
        tokens_csv = out / f"tokens-{srid}.csv"
        write_csv([{k: v for k, v in r.items() if k != "run_id"} for r in token_rows], tokens_csv)
    flat = [
        {"mode": m, "query_id": q, **{k: v for k, v in r.items() if k != "text"}}
        for m, bq in results.items()
        for q, rows in bq.items()
        for r in rows
    ]
    if flat:
        write_csv(flat, csv_path)
    return Report(report=str(path), topk_csv=str(csv_path) if flat else None, tokens_csv=tokens_csv and str(tokens_csv))
