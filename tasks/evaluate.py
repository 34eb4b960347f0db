"""Evaluation stages: is the attribution right? Fact tracing, tail-patch, LDS, brittleness, LOO, calibration.

Score matrices (queries × training examples) travel between tasks as .npz files in the evaluation
workspace; tasks return paths and small results that carry their metrics, which the flow logs.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from pydantic import Field

from dataworth.attribution.curvature import fit_fisher
from dataworth.attribution.optimizer_state import load_second_moments
from dataworth.attribution.projection import Layout
from dataworth.attribution.scoring import Scorer
from dataworth.config import ALL_SCORE_MODES, GenerationConfig, QuerySpec, ScoreConfig, gradient_modes
from dataworth.data import pad_token_id
from dataworth.evaluation.fact_tracing import trace_facts_in_scores
from dataworth.evaluation.lds import linear_datamodeling_score, sample_subsets
from dataworth.evaluation.matrices import (
    attribution_values,
    load_matrices,
    merge_matrices,
    rank_agreement,
    save_matrices,
)
from dataworth.evaluation.subsets import plan_removals, subset_key
from dataworth.evaluation.tail_patch import completion_log_probs, tail_patch_scores
from dataworth.training import RetrainConfig, train_causal_lm
from storage import IndexStore

from .common import (
    CACHE,
    IO_RETRIES,
    MODEL_LOCK,
    PERSIST,
    StageResult,
    encode_index_queries,
    gradient_batches,
    index_curvature,
    index_query_gradients,
    index_task_mix,
    on_compute_thread,
    open_index_model,
    published_manifest,
)

# Queries of an evaluation come with their completions: nothing is generated, encoding batches of 16.
_ENCODE_BATCH = 16


class MethodTable(StageResult):
    """The cells of the evaluation table one stage measured: method -> metric -> value."""

    table: dict[str, dict[str, float | int]] = Field(description="method -> metric -> value.")

    def metrics(self) -> dict[str, float]:
        return {f"{method}.{name}": v for method, row in self.table.items() for name, v in row.items()}


class LDSResult(MethodTable):
    """Linear datamodeling scores per method, and the first query's scatter for the report."""

    scatter: dict[str, Any] = Field(description='{"query", "actual": [subsets], "predicted": method -> [subsets]}.')

    def metrics(self) -> dict[str, float]:
        return {f"{method}.lds": row["lds"] for method, row in self.table.items()}


class LOOResult(StageResult):
    """Influence vs actual leave-one-out retraining on softmax regression."""

    pearson_hessian: float
    spearman_hessian: float
    pearson_fisher: float
    spearman_fisher: float
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {f"loo.{k}": v for k, v in self.model_dump().items()}


class KronfluenceResult(StageResult):
    """The kronfluence score matrix and the time it took (factors and scores)."""

    path: str = Field(description="The .npz score matrix (method 'kronfluence').")
    seconds: float = Field(description="Fitting the EKFAC factors plus scoring.")

    def metrics(self) -> dict[str, float]:
        return {"kronfluence.seconds": self.seconds}


class RecordedCalibration(StageResult):
    """The calibration written into an index manifest."""

    calibration: dict[str, Any] = Field(description="damping_factor, proxy, sweep, tune/test values, ...")

    @property
    def as_json(self) -> str:
        return json.dumps(self.calibration, indent=2)

    def metrics(self) -> dict[str, float]:
        cal = self.calibration
        return {
            "calibrated_damping_factor": cal["damping_factor"],
            f"calibration.{cal['proxy']}.test": cal["test"],
            **{f"calibrated_{k}": v for k, v in cal.get("logging", {}).items()},
        }


def _examples(index_uri: str) -> dict:
    t = IndexStore(index_uri).read_examples(columns=["example_id", "document_id", "text", "input_ids"]).to_pydict()
    order = np.argsort(t["example_id"])
    if not np.array_equal(np.asarray(t["example_id"])[order], np.arange(len(order))):
        raise ValueError(f"examples of {index_uri!r} are not numbered 0..N-1; rebuild the index")
    return {k: [t[k][i] for i in order] for k in t}


@task(name="fact_tracing_eval")
def fact_tracing_eval(
    index_uri: str, matrix_paths: list[str], relevant: dict[str, list[str]], k: int = 10
) -> MethodTable:
    """MRR and recall@k of the documents that state each queried fact, per method."""
    methods, query_ids = merge_matrices(matrix_paths)
    docs = _examples(index_uri)["document_id"]
    return MethodTable(table=trace_facts_in_scores(methods, query_ids, docs, relevant, k))


@task(name="tail_patch_eval", tags=["gpu"])
@on_compute_thread
def tail_patch_eval(
    index_uri: str, matrix_paths: list[str], queries: list[QuerySpec], top_k: int, lr: float, optimizer: str
) -> MethodTable:
    """TrackStar tail-patch: mean Δ log p(completion) after one step on each of a method's top-k examples
    (and on k random examples, the baseline)."""
    methods, query_ids = merge_matrices(matrix_paths)
    index = {q: i for i, q in enumerate(query_ids)}
    queries = [q for q in queries if q.id in index]
    seqs = _examples(index_uri)["input_ids"]
    # A private copy of the model: tail-patch steps on it.
    lm = open_index_model(index_uri, fresh=True)
    moments = None
    if optimizer == "state":  # the index's optimizer state, else the one saved beside the model
        state = lm.manifest.config.logging.optimizer_state or lm.manifest.config.model.name_or_path
        moments = load_second_moments(state, lm.model)
    with MODEL_LOCK:
        enc = encode_index_queries(lm, queries, GenerationConfig(), _ENCODE_BATCH)
        pad = pad_token_id(lm.tokenizer)
        # The same step on random examples is the baseline: a step size that damages every target
        # shows up there too, and only the lift over it is attribution.
        rng = np.random.default_rng(0)
        picks = {
            name: {q.id: np.argsort(-scores[index[q.id]], kind="stable")[:top_k] for q in enc}
            for name, scores in methods.items()
        }
        picks["random"] = {q.id: rng.choice(len(seqs), size=min(top_k, len(seqs)), replace=False) for q in enc}
        deltas: dict[str, list[float]] = {name: [] for name in picks}
        for q in enc:
            # Each step starts from the same weights (restored exactly after every candidate), so an example that
            # several methods retrieve (BM25 and its hybrids, relatif and cosine) is patched once for all of them.
            chosen = {name: [int(i) for i in by_query[q.id]] for name, by_query in picks.items()}
            union = sorted({i for ids in chosen.values() for i in ids})
            step = tail_patch_scores(
                lm.model, [seqs[i] for i in union], [q], pad, lr=lr, optimizer=optimizer, second_moments=moments
            )[0]
            delta = dict(zip(union, step.tolist()))
            for name, ids in chosen.items():
                deltas[name].append(float(np.mean([delta[i] for i in ids])))
        out = {name: {"tail_patch": float(np.mean(d))} for name, d in deltas.items()}
    return MethodTable(table=out)


@task(name="plan_subsets", cache_policy=CACHE, **PERSIST)
def plan_subsets(n_examples: int, n_subsets: int, fraction: float, seed: int, out_path: str) -> dict:
    """Random LDS subsets, saved as a [subsets, examples] boolean .npy; {"path", "keeps": the examples of
    each subset, "keys": each subset's key}."""
    masks = sample_subsets(n_examples, n_subsets, fraction, seed)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    np.save(out_path, masks)
    keeps = [np.flatnonzero(m).tolist() for m in masks]
    return {"path": out_path, "keeps": keeps, "keys": [subset_key(m) for m in masks]}


@task(name="plan_brittleness")
def plan_brittleness(
    matrix_paths: list[str], methods: list[str], n_queries: int, ks: list[int], n_examples: int, seed: int
) -> list[dict]:
    """The retrainings of the brittleness test (dataworth.evaluation.subsets.plan_removals), with their keys."""
    scores, _ = merge_matrices(matrix_paths)
    return plan_removals(scores, methods, n_queries, ks, n_examples, seed)


# Not keyed on the index: indexes of other logging configs over the same corpus and model share retrained models.
@task(
    name="retrain_and_measure",
    cache_policy=CACHE - "keep" - "index_uri",
    **PERSIST,
    tags=["gpu"],
    **IO_RETRIES,
    task_run_name="retrain-{keep_key}",
)
@on_compute_thread
def retrain_and_measure(
    index_uri: str,
    corpus_key: str,
    keep: list[int] | None,
    keep_key: str,
    recipe: RetrainConfig,
    queries: list[QuerySpec],
) -> list[float]:
    """Train the reference architecture on the kept examples only (every example with keep=None, keep_key
    "all"); completion log-probs of every query.

    Cached on (corpus, subset hash, recipe, queries): LDS and brittleness share retrained models.
    """
    ex = _examples(index_uri)
    keep = range(len(ex["input_ids"])) if keep is None else keep
    lm = open_index_model(index_uri)
    with MODEL_LOCK:
        model = train_causal_lm(lm.manifest.config.model.name_or_path, [ex["input_ids"][i] for i in keep], recipe)
        retrained = lm._replace(model=model)
        enc = encode_index_queries(retrained, queries, GenerationConfig(), _ENCODE_BATCH)
        return completion_log_probs(model, enc, pad_token_id(lm.tokenizer)).tolist()


@task(name="prefix_methods")
def prefix_methods(matrix_path: str, prefix: str, out_path: str) -> str:
    """The score matrices of `matrix_path` written again to `out_path` with each method named prefix + name (the
    checkpoint sums beside the final model's own modes in one table)."""
    methods, query_ids = load_matrices(matrix_path)
    return save_matrices(Path(out_path), {f"{prefix}{name}": m for name, m in methods.items()}, query_ids)


@task(name="lds_eval")
def lds_eval(matrix_paths: list[str], masks_path: str, actual: list[list[float]], out_dir: str) -> LDSResult:
    """Spearman correlation, per query, of retrained log-probs with summed predicted scores, per method."""
    methods, query_ids = merge_matrices(matrix_paths)
    masks = np.load(masks_path)
    actual_arr = np.asarray(actual, dtype=np.float64).T  # (n_queries, n_subsets)
    out, predicted = {}, {}
    for name, scores in methods.items():
        scores = attribution_values(scores)
        res = linear_datamodeling_score(scores, masks, actual_arr)
        out[name] = {"lds": float(res["lds"]), "lds_valid_queries": int(res["n_valid"])}
        predicted[name] = (scores @ masks.T.astype(np.float64))[0].tolist()
    scatter = {"query": query_ids[0], "actual": actual_arr[0].tolist(), "predicted": predicted}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, "lds_scatter.json").write_text(json.dumps(scatter))
    return LDSResult(table=out, scatter=scatter)


class StorePrecision(StageResult):
    """How far gradients stored in a smaller dtype keep the rankings of the float32 store."""

    table: dict[str, dict[str, float]] = Field(
        description="storage dtype -> bytes_ratio (table bytes ÷ float32's) and, per gradient mode, "
        "<mode>.spearman and <mode>.top<k>_overlap against the float32 store's scores."
    )
    examples: int = Field(description="Stored gradients compared.")
    seconds: float = Field(description="Wall time of the stage.")

    def metrics(self) -> dict[str, float]:
        return {f"store.{dtype}.{name}": v for dtype, row in self.table.items() for name, v in row.items()}


@task(name="store_precision_eval", tags=["gpu"])
@on_compute_thread
def store_precision_eval(
    index_uri: str, queries: list[QuerySpec], score: ScoreConfig, dtypes: list[str], workdir: str, k: int = 10
) -> StorePrecision:
    """The index's gradients written again as real gradients tables in float32 and in each of `dtypes` (under
    `workdir`), read back, the curvature refitted on what each stores (as `dataworth index` with that
    storage_dtype would), and every gradient mode of `score` scored against the queries: bytes and rank agreement
    (Spearman, top-k overlap, mean over queries) with the float32 table. Needs an index stored in float32."""
    start = time.perf_counter()
    store = IndexStore(index_uri)
    manifest = published_manifest(store)
    if manifest.config.logging.storage_dtype != "float32":
        raise ValueError(
            f"store_precision_eval compares with a float32 store, and index {index_uri!r} stores "
            f"{manifest.config.logging.storage_dtype}: index with logging.storage_dtype='float32'"
        )
    modes = gradient_modes(score.modes, kinds=("rrf", "rerank", "linear", "ann"))
    _enc, q_grads = index_query_gradients(open_index_model(store, manifest), queries, GenerationConfig(), 16)
    damping = index_curvature(store, manifest, score.damping_factor).damping_factor
    layout, n = Layout.from_json(manifest.layout), manifest.num_examples
    matrices, sizes = {}, {}
    Path(workdir).mkdir(parents=True, exist_ok=True)
    batches = score.train_batch_size
    for dtype in ["float32", *dtypes]:
        with tempfile.TemporaryDirectory(dir=workdir, prefix=f"store-{dtype}-") as tmp:
            copy = IndexStore(tmp)
            for shard, (ids, vectors) in enumerate(gradient_batches(store, batches, manifest.gradients_version)):
                copy.write_gradient_shard(shard, ids.numpy(), vectors.numpy(), dtype, new=True)
            sizes[dtype] = copy.bytes_stored()
            stored = lambda: (v for _i, v in gradient_batches(copy, batches))  # noqa: B023, E731 (used at once)
            curvature = fit_fisher(layout, manifest.config.curvature, stored).with_damping(damping)
            task_mix = index_task_mix(score, manifest)
            scorer = Scorer(q_grads, curvature, modes, k, full_matrix_size=n, task_mix=task_mix)
            for ids, vectors in gradient_batches(copy, batches):
                scorer.update(ids, vectors)
            matrices[dtype] = {m: v.numpy() for m, v in scorer.full.items()}
    table = {}
    for dtype in dtypes:
        row = {"bytes_ratio": sizes[dtype] / sizes["float32"]}
        for mode in modes:
            rho, overlap = rank_agreement(matrices[dtype][mode], matrices["float32"][mode], k)
            row[f"{mode}.spearman"], row[f"{mode}.top{k}_overlap"] = rho, overlap
        table[dtype] = row
    return StorePrecision(table=table, examples=n, seconds=time.perf_counter() - start)


@task(name="loo_eval", cache_policy=CACHE, **PERSIST)
@on_compute_thread
def loo_eval(seed: int) -> LOOResult:
    """Influence vs actual leave-one-out retraining on softmax regression (a convex problem)."""
    from dataworth.evaluation.loo import loo_agreement

    start = time.perf_counter()
    res = loo_agreement(seed=seed)
    out = {k: float(res[k]) for k in ("pearson_hessian", "spearman_hessian", "pearson_fisher", "spearman_fisher")}
    return LOOResult(**out, seconds=time.perf_counter() - start)


@task(name="kronfluence_scores", cache_policy=CACHE, **PERSIST, tags=["gpu"])
@on_compute_thread
def kronfluence_eval(
    index_uri: str, examples_version: int, queries: list[QuerySpec], out_path: str
) -> KronfluenceResult:
    """EKFAC influence from kronfluence on the same model, examples and queries (optional extra)."""
    from dataworth.evaluation.baselines.kronfluence import kronfluence_scores

    ex = _examples(index_uri)
    # A private copy of the model: kronfluence wraps its modules.
    lm = open_index_model(index_uri, fresh=True)
    with MODEL_LOCK:
        enc = encode_index_queries(lm, queries, GenerationConfig(), _ENCODE_BATCH)
        res = kronfluence_scores(
            lm.model,
            ex["input_ids"],
            enc,
            pad_token_id(lm.tokenizer),
            output_dir=str(Path(out_path).parent / "kronfluence"),
        )
    path = save_matrices(Path(out_path), {"kronfluence": res["scores"]}, [q.id for q in queries])
    return KronfluenceResult(path=path, seconds=res["seconds_factors"] + res["seconds_scores"])


def _proxy(
    scores: np.ndarray,
    rows: list[int],
    query_ids: list[str],
    proxy: str,
    docs: list[str],
    relevant: dict[str, list[str]] | None,
    masks: np.ndarray | None,
    actual: np.ndarray | None,
) -> float:
    if proxy == "fact_mrr":
        ids = [query_ids[r] for r in rows]
        return trace_facts_in_scores({"m": scores[rows]}, ids, docs, relevant, k=10)["m"]["mrr"]
    return float(linear_datamodeling_score(scores[rows], masks, actual[rows])["lds"])


@task(name="calibrate_damping", tags=["gpu"])
@on_compute_thread
def calibrate_damping(
    index_uri: str,
    queries: list[QuerySpec],
    damping_factors: list[float],
    proxy: str,
    holdout_fraction: float,
    seed: int,
    modes: list[str],
    relevant: dict[str, list[str]] | None = None,
    masks_path: str | None = None,
    actual: list[list[float]] | None = None,
    record: bool = True,
    task_mixes: list[float] | None = None,
) -> dict:
    """Choose the damping factor that maximizes a proxy on a random half of the queries, report it on the
    other half, and record the choice in the index manifest (queries then use it by default). With trackstar
    among the modes, also choose its task_mix among `task_mixes` at that damping (recorded as `task_mix`).
    """
    from dataworth.attribution.scoring import Scorer

    if proxy == "fact_mrr" and relevant is None:
        raise ValueError(
            "calibrate proxy 'fact_mrr' needs known relevant documents (a fact benchmark); use proxy='lds'"
        )
    if proxy == "lds" and (masks_path is None or actual is None):
        raise ValueError("calibrate proxy 'lds' needs retrained subsets; enable lds or use proxy='fact_mrr'")
    store = IndexStore(index_uri)
    lm = open_index_model(store)
    manifest = lm.manifest
    encoded, q_grads = index_query_gradients(lm, queries, GenerationConfig(), _ENCODE_BATCH)
    query_ids = [q.id for q in encoded]
    fitted = index_curvature(store, manifest, manifest.config.curvature.damping_factor)
    n = manifest.num_examples
    # trackstar's curvature also depends on task_mix, chosen below at the damping the other modes choose
    curv_modes = [m for m in modes if m in ALL_SCORE_MODES and m not in ("dot", "trackstar")] or ["influence"]
    scorers = {
        df: Scorer(q_grads, fitted.with_damping(df), curv_modes, top_k=1, full_matrix_size=n) for df in damping_factors
    }
    for ids, vectors, _ in store.iter_gradients(4096, version=manifest.gradients_version):
        for sc in scorers.values():
            sc.update(torch.tensor(ids), torch.tensor(vectors))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(query_ids))
    cut = max(1, int(round(holdout_fraction * len(query_ids))))
    tune, test = sorted(perm[:cut].tolist()), sorted(perm[cut:].tolist()) or sorted(perm[:cut].tolist())
    docs = _examples(index_uri)["document_id"]
    masks = np.load(masks_path) if masks_path else None
    act = np.asarray(actual, dtype=np.float64).T if actual is not None else None
    sweep = {}
    for df, sc in scorers.items():
        vals = {
            split: float(
                np.mean(
                    [_proxy(sc.full[m].numpy(), rows, query_ids, proxy, docs, relevant, masks, act) for m in curv_modes]
                )
            )
            for split, rows in (("tune", tune), ("test", test))
        }
        sweep[str(df)] = vals
    best = max(damping_factors, key=lambda df: sweep[str(df)]["tune"])
    result = {
        "damping_factor": best,
        "proxy": proxy,
        "modes": curv_modes,
        "sweep": sweep,
        "tune": sweep[str(best)]["tune"],
        "test": sweep[str(best)]["test"],
        "tune_queries": len(tune),
        "test_queries": len(test),
    }
    if "trackstar" in modes and task_mixes:
        # trackstar's query-set share of the curvature, at the chosen damping (one more pass, all shares at once)
        mixers = {
            w: Scorer(q_grads, fitted.with_damping(best), ["trackstar"], top_k=1, full_matrix_size=n, task_mix=w)
            for w in task_mixes
        }
        for ids, vectors, _ in store.iter_gradients(4096, version=manifest.gradients_version):
            for sc in mixers.values():
                sc.update(torch.tensor(ids), torch.tensor(vectors))
        mix_sweep = {
            str(w): {
                split: _proxy(sc.full["trackstar"].numpy(), rows, query_ids, proxy, docs, relevant, masks, act)
                for split, rows in (("tune", tune), ("test", test))
            }
            for w, sc in mixers.items()
        }
        result["task_mix"] = max(task_mixes, key=lambda w: mix_sweep[str(w)]["tune"])
        result["task_mix_sweep"] = mix_sweep
    if record:
        record_calibration.fn(index_uri, result)
    return result


@task(name="choose_calibration")
def choose_calibration(sweeps: dict[str, dict], sizes: dict[str, dict[str, int]], swept_sizes: bool) -> dict:
    """The best (projection size, damping) on the tuning queries, from one damping sweep per projection size.

    sweeps: size label ("32x32") -> calibrate_damping's result on that size's index; sizes: label ->
    {"proj_dim_in", "proj_dim_out"}. With swept_sizes, the choice also names the size and every size's best.
    """
    if not sweeps:
        raise ValueError("choose_calibration needs at least one damping sweep; enable calibrate on an index")
    best = max(sweeps, key=lambda name: sweeps[name]["tune"])
    chosen = {**sweeps[best], "size": best}
    if swept_sizes:
        chosen.update(
            proj_dim=best,
            logging=dict(sizes[best]),
            proj_sweep={
                name: {"damping_factor": r["damping_factor"], "tune": r["tune"], "test": r["test"]}
                for name, r in sweeps.items()
            },
        )
    return chosen


@task(name="record_calibration", **IO_RETRIES)
def record_calibration(index_uri: str, calibration: dict) -> RecordedCalibration:
    """Write the chosen calibration into the index manifest: queries then use its damping by default."""
    store = IndexStore(index_uri)
    manifest = store.read_manifest()
    store.publish_manifest(manifest.model_copy(update={"calibration": calibration}))
    return RecordedCalibration(calibration=calibration)
