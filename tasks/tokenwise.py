"""Token-wise attribution stages: split a scoring run's top scores over tokens, and draw them in its report."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch
from prefect import get_run_logger, task
from pydantic import Field

from dataworth.attribution.scoring import needs_norms
from dataworth.attribution.tokenwise import check_tokenwise, token_splits
from dataworth.config import GenerationConfig, QuerySpec, ScoreConfig
from dataworth.data import pad_token_id
from storage import IndexManifest, IndexStore, results_store
from storage.schemas import token_scores_schema

from .common import (
    IO_RETRIES,
    MODEL_LOCK,
    StageResult,
    index_curvature,
    index_norms,
    index_query_gradients,
    index_task_mix,
    on_compute_thread,
    open_index_model,
)


class TokenScored(StageResult):
    """The token_scores rows tokenwise_scores wrote for one scoring run."""

    score_run_id: str = Field(description="Run id of the scores split (and of the token_scores rows).")
    pairs: int = Field(description="(mode, query, example) scores split.")
    rows: int = Field(description="Token rows written (both sides).")
    max_split_error: float = Field(
        description="Largest |Σ token scores − the pair's score| over both sides, relative to max(1, |score|)."
    )
    max_score_gap: float = Field(
        description="Largest |the pair's recomputed score − its stored score|, relative to max(1, |score|): float32 "
        "storage and scoring, and a generated completion that re-tokenizes differently, show here."
    )
    seconds: float = Field(description="Time of the token gradients and splits.")

    def metrics(self) -> dict[str, float]:
        return {
            "tokenwise_pairs": self.pairs,
            "tokenwise_rows": self.rows,
            "tokenwise_seconds": self.seconds,
            "tokenwise_max_split_error": self.max_split_error,
            "tokenwise_max_score_gap": self.max_score_gap,
        }


def _decoder(tokenizer):
    cache: dict[int, str] = {}

    def decode(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id])
        return cache[token_id]

    return decode


@task(name="tokenwise_scores", tags=["gpu"], **IO_RETRIES)
@on_compute_thread
def tokenwise_scores(
    index_uri: str,
    manifest: IndexManifest,
    score_run_id: str,
    score: ScoreConfig,
    generation: GenerationConfig,
    results_uri: str | None = None,
) -> TokenScored:
    """Each query's top score.tokenwise_top examples of every gradient mode of a stored scoring run, each score
    split over the query's completion tokens and over the example's tokens, written to the results' token_scores
    table (the run's earlier rows replaced). bm25 and the hybrid modes are skipped. `generation` is the run's: a
    generated completion is generated again (greedy, in the same batches), as its stored text need not tokenize back
    to the same tokens."""
    log = get_run_logger()
    modes = check_tokenwise(manifest.config.logging, score.modes)
    store, results = IndexStore(index_uri), results_store(index_uri, results_uri)
    start = time.perf_counter()
    stored_queries = results.read_queries(score_run_id).to_pylist()
    top = [
        r
        for r in results.read_scores(score_run_id).to_pylist()
        if r["mode"] in modes and r["rank"] <= score.tokenwise_top
    ]
    top.sort(key=lambda r: (modes.index(r["mode"]), r["query_id"], r["rank"]))
    if not stored_queries or not top:
        log.warning("scoring run %s has no stored scores of %s in %s: nothing to split", score_run_id, modes, results)
        results.write_token_scores(score_run_id, token_scores_schema().empty_table())
        return TokenScored(
            score_run_id=score_run_id, pairs=0, rows=0, max_split_error=0.0, max_score_gap=0.0, seconds=0.0
        )
    index = open_index_model(store, manifest)
    # The completions as attributed, so every query's gradient is the scored one; all of the run's queries, as
    # trackstar's task curvature is fitted on the whole set.
    specs = [
        QuerySpec(id=q["query_id"], prompt=q["prompt"], completion=None if q["generated"] else q["completion"])
        for q in stored_queries
    ]
    encoded, q_grads = index_query_gradients(index, specs, generation, score.query_batch_size)
    for q, e in zip(stored_queries, encoded):
        if len(e.completion_ids) != q["num_completion_tokens"]:
            log.warning(
                "query %r: %d completion tokens now, %d when scored; its token-wise scores split another score",
                e.id,
                len(e.completion_ids),
                q["num_completion_tokens"],
            )
    row_of = {q.id: i for i, q in enumerate(encoded)}
    ids = np.array(sorted({r["example_id"] for r in top}), dtype=np.int64)
    where = f"example_id IN ({', '.join(str(int(i)) for i in ids)})"
    examples = {
        r["example_id"]: r
        for r in store.read_examples(
            ["example_id", "document_id", "input_ids", "label_mask"], version=manifest.examples_version, where=where
        ).to_pylist()
    }
    vectors, _ = store.read_gradients_by_id(ids, manifest.gradients_version)
    stored = {int(i): torch.from_numpy(v) for i, v in zip(ids, vectors)}
    curvature = index_curvature(store, manifest, score.damping_factor)
    norms = None
    if needs_norms(modes):
        all_norms = index_norms(store, manifest, curvature, score.train_batch_size, results)
        norms = {int(i): float(all_norms[int(i)]) for i in ids}
    logging = manifest.config.logging
    pairs = [(row_of[r["query_id"]], r["mode"], r["example_id"]) for r in top]
    with MODEL_LOCK:
        splits = token_splits(
            index.model,
            logging,
            index.projections,
            encoded,
            q_grads,
            curvature,
            pairs,
            {i: examples[i]["input_ids"] for i in stored},
            pad_token_id(index.tokenizer),
            batch_size=logging.batch_size,
            stored=stored,
            norms=norms,
            task_mix=index_task_mix(score, manifest),
            label_masks={i: examples[i]["label_mask"] for i in stored},
        )
    seconds = time.perf_counter() - start
    decode = _decoder(index.tokenizer)
    cols: dict[str, list] = {name: [] for name in token_scores_schema().names}
    split_error = score_gap = 0.0
    for r, sp in zip(top, splits):
        scale = max(1.0, abs(sp.score))
        score_gap = max(score_gap, abs(sp.score - r["score"]) / scale)
        for side, tokens, values in (
            ("query", sp.query_tokens, sp.query_scores),
            ("train", sp.train_tokens, sp.train_scores),
        ):
            split_error = max(split_error, abs(float(values.sum()) - sp.score) / scale)
            n = len(tokens)
            cols["run_id"] += [score_run_id] * n
            cols["mode"] += [sp.mode] * n
            cols["query_id"] += [r["query_id"]] * n
            cols["rank"] += [r["rank"]] * n
            cols["example_id"] += [sp.example_id] * n
            cols["document_id"] += [examples[sp.example_id]["document_id"]] * n
            cols["side"] += [side] * n
            cols["position"] += list(range(n))
            cols["token_id"] += [int(t) for t in tokens]
            cols["token"] += [decode(int(t)) for t in tokens]
            cols["score"] += values.tolist()
            cols["total"] += [sp.score] * n
    table = pa.table(cols, schema=token_scores_schema())
    results.write_token_scores(score_run_id, table)
    log.info(
        "token-wise scores of %d pairs (%d rows) in %.1f s; largest split error %.1e, score gap %.1e",
        len(splits),
        table.num_rows,
        seconds,
        split_error,
        score_gap,
    )
    return TokenScored(
        score_run_id=score_run_id,
        pairs=len(splits),
        rows=table.num_rows,
        max_split_error=split_error,
        max_score_gap=score_gap,
        seconds=seconds,
    )
