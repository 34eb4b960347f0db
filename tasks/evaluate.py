"""Evaluation stages: is the attribution right? Fact tracing, tail-patch, LDS, brittleness, LOO.

Score matrices (queries × training examples) travel between tasks as .npz files in the
evaluation workspace; tasks return paths and small dicts.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from prefect import task

from dataworth.config import GenerationConfig, ModelConfig, QuerySpec
from dataworth.evaluation.baselines.bm25 import BM25, tokenize_words
from dataworth.evaluation.fact_tracing import fact_tracing_metrics
from dataworth.evaluation.lds import linear_datamodeling_score, sample_subsets
from dataworth.evaluation.tail_patch import completion_log_probs, tail_patch_scores
from dataworth.model import context_length, load_model
from dataworth.queries import encode_queries
from dataworth.training import RetrainConfig, train_causal_lm
from storage import IndexStore

from .common import CACHE, IO_RETRIES, MODEL_LOCK
from .tracking import Tracker


def load_matrices(path: str) -> tuple[dict[str, np.ndarray], list[str]]:
    data = np.load(path, allow_pickle=False)
    query_ids = [str(q) for q in data["query_ids"]]
    return {k: data[k] for k in data.files if k != "query_ids"}, query_ids


def save_matrices(path: Path, matrices: dict[str, np.ndarray], query_ids: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **matrices, query_ids=np.array(query_ids))
    tmp.replace(path)
    return str(path)


def _examples(index_uri: str) -> dict:
    t = IndexStore(index_uri).read_examples(columns=["example_id", "document_id", "text", "input_ids"]).to_pydict()
    order = np.argsort(t["example_id"])
    if not np.array_equal(np.asarray(t["example_id"])[order], np.arange(len(order))):
        raise ValueError(f"examples of {index_uri!r} are not numbered 0..N-1; rebuild the index")
    return {k: [t[k][i] for i in order] for k in t}


@task(name="bm25_scores", cache_policy=CACHE, persist_result=True)
def bm25_scores(index_uri: str, examples_version: int, queries: list[QuerySpec], out_path: str) -> str:
    """BM25 of each query's prompt + completion against every training example's text."""
    ex = _examples(index_uri)
    bm25 = BM25([tokenize_words(t) for t in ex["text"]])
    scores = np.stack([bm25.scores(tokenize_words(q.prompt + (q.completion or ""))) for q in queries])
    return save_matrices(Path(out_path), {"bm25": scores.astype(np.float64)}, [q.id for q in queries])


def _methods(matrix_paths: list[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    merged, ids = {}, None
    for p in matrix_paths:
        m, q = load_matrices(p)
        if ids is not None and q != ids:
            raise ValueError(f"score matrices {matrix_paths} hold different queries")
        ids = q
        merged.update(m)
    return merged, ids


@task(name="fact_tracing_eval")
def fact_tracing_eval(
    index_uri: str,
    matrix_paths: list[str],
    relevant: dict[str, list[str]],
    k: int = 10,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """MRR and recall@k of the documents that state each queried fact, per method."""
    methods, query_ids = _methods(matrix_paths)
    docs = _examples(index_uri)["document_id"]
    out = {}
    for name, scores in methods.items():
        order = np.argsort(-scores, axis=1, kind="stable")[:, : 5 * k]
        rankings = {q: [docs[i] for i in order[qi]] for qi, q in enumerate(query_ids)}
        m = fact_tracing_metrics(rankings, {q: set(relevant[q]) for q in query_ids}, k=k)
        out[name] = {"mrr": m["mrr"], f"recall@{k}": m[f"recall@{k}"]}
    Tracker.attach(tracking_uri, run_id).metrics({f"{n}.{m}": v for n, d in out.items() for m, v in d.items()})
    return out


@task(name="tail_patch_eval", tags=["gpu"])
def tail_patch_eval(
    index_uri: str,
    matrix_paths: list[str],
    queries: list[QuerySpec],
    top_k: int,
    lr: float,
    optimizer: str,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """TrackStar tail-patch: mean Δ log p(completion) after one step on each of a method's top-k examples
    (and on k random examples, the baseline)."""
    methods, query_ids = _methods(matrix_paths)
    index = {q: i for i, q in enumerate(query_ids)}
    queries = [q for q in queries if q.id in index]
    seqs = _examples(index_uri)["input_ids"]
    manifest = IndexStore(index_uri).read_manifest()
    with MODEL_LOCK:
        model, tok = load_model(ModelConfig(**manifest["config"]["model"]))
        enc = encode_queries(model, tok, queries, GenerationConfig(), context_length(model, 1024))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # The same step on random examples is the baseline: a step size that damages every target
        # shows up there too, and only the lift over it is attribution.
        rng = np.random.default_rng(0)
        picks = {
            name: {q.id: np.argsort(-scores[index[q.id]], kind="stable")[:top_k] for q in enc}
            for name, scores in methods.items()
        }
        picks["random"] = {q.id: rng.choice(len(seqs), size=min(top_k, len(seqs)), replace=False) for q in enc}
        out = {}
        for name, chosen in picks.items():
            deltas = [
                float(
                    tail_patch_scores(
                        model, [seqs[i] for i in chosen[q.id]], [q], pad, lr=lr, optimizer=optimizer
                    ).mean()
                )
                for q in enc
            ]
            out[name] = {"tail_patch": float(np.mean(deltas))}
    Tracker.attach(tracking_uri, run_id).metrics({f"{n}.tail_patch": d["tail_patch"] for n, d in out.items()})
    return out


@task(name="plan_subsets", cache_policy=CACHE, persist_result=True)
def plan_subsets(n_examples: int, n_subsets: int, fraction: float, seed: int, out_path: str) -> dict:
    masks = sample_subsets(n_examples, n_subsets, fraction, seed)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    np.save(out_path, masks)
    keys = [hashlib.sha256(np.packbits(m).tobytes()).hexdigest()[:16] for m in masks]
    return {"path": out_path, "keys": keys}


def _keep_key(keep: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(keep).tobytes()).hexdigest()[:16]


# Not keyed on the index: indexes of other logging configs over the same corpus and model share retrained models.
@task(
    name="retrain_and_measure",
    cache_policy=CACHE - "keep" - "index_uri",
    persist_result=True,
    tags=["gpu"],
    **IO_RETRIES,
    task_run_name="retrain-{keep_key}",
)
def retrain_and_measure(
    index_uri: str, corpus_key: str, keep: list[int], keep_key: str, recipe: RetrainConfig, queries: list[QuerySpec]
) -> list[float]:
    """Train the reference architecture on the kept examples only; completion log-probs of every query.

    Cached on (corpus, subset hash, recipe, queries): LDS and brittleness share retrained models.
    """
    ex = _examples(index_uri)
    manifest = IndexStore(index_uri).read_manifest()
    ref = manifest["config"]["model"]["name_or_path"]
    with MODEL_LOCK:
        model = train_causal_lm(ref, [ex["input_ids"][i] for i in keep], recipe)
        _, tok = load_model(ModelConfig(**manifest["config"]["model"]))
        enc = encode_queries(model, tok, queries, GenerationConfig(), context_length(model, 1024))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return completion_log_probs(model, enc, pad).tolist()


@task(name="lds_eval")
def lds_eval(
    matrix_paths: list[str],
    masks_path: str,
    actual: list[list[float]],
    out_dir: str,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """Spearman correlation, per query, of retrained log-probs with summed predicted scores, per method."""
    methods, query_ids = _methods(matrix_paths)
    masks = np.load(masks_path)
    actual_arr = np.asarray(actual, dtype=np.float64).T  # (n_queries, n_subsets)
    out, scatter = {}, {}
    for name, scores in methods.items():
        res = linear_datamodeling_score(scores, masks, actual_arr)
        out[name] = {"lds": float(res["lds"]), "lds_valid_queries": int(res["n_valid"])}
        scatter[name] = (scores @ masks.T.astype(np.float64))[0].tolist()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, "lds_scatter.json").write_text(
        json.dumps({"query": query_ids[0], "actual": actual_arr[0].tolist(), "predicted": scatter})
    )
    Tracker.attach(tracking_uri, run_id).metrics({f"{n}.lds": d["lds"] for n, d in out.items()})
    return out


@task(name="loo_eval", cache_policy=CACHE, persist_result=True)
def loo_eval(seed: int, run_id: str | None = None, tracking_uri: str | None = None) -> dict:
    """Influence vs actual leave-one-out retraining on softmax regression (a convex problem)."""
    from dataworth.evaluation.loo import loo_agreement

    start = time.perf_counter()
    res = loo_agreement(seed=seed)
    out = {k: float(res[k]) for k in ("pearson_hessian", "spearman_hessian", "pearson_fisher", "spearman_fisher")}
    out["seconds"] = time.perf_counter() - start
    Tracker.attach(tracking_uri, run_id).metrics({f"loo.{k}": v for k, v in out.items()})
    return out


@task(name="kronfluence_scores", cache_policy=CACHE, persist_result=True, tags=["gpu"])
def kronfluence_eval(
    index_uri: str,
    examples_version: int,
    queries: list[QuerySpec],
    out_path: str,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """EKFAC influence from kronfluence on the same model, examples and queries (optional extra)."""
    from dataworth.evaluation.baselines.kronfluence import kronfluence_scores

    ex = _examples(index_uri)
    manifest = IndexStore(index_uri).read_manifest()
    with MODEL_LOCK:
        model, tok = load_model(ModelConfig(**manifest["config"]["model"]))
        enc = encode_queries(model, tok, queries, GenerationConfig(), context_length(model, 1024))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        res = kronfluence_scores(
            model, ex["input_ids"], enc, pad, output_dir=str(Path(out_path).parent / "kronfluence")
        )
    path = save_matrices(Path(out_path), {"kronfluence": res["scores"]}, [q.id for q in queries])
    seconds = res["seconds_factors"] + res["seconds_scores"]
    Tracker.attach(tracking_uri, run_id).metrics({"kronfluence.seconds": seconds})
    return {"path": path, "seconds": seconds}


def rank_correlations(matrix_paths: list[str], reference: str) -> dict[str, float]:
    """Mean per-query Spearman correlation of each method's scores with the reference method's."""
    from dataworth.evaluation.lds import spearman

    methods, _ = _methods(matrix_paths)
    ref = methods[reference]
    return {
        n: float(np.nanmean([spearman(s[i], ref[i]) for i in range(ref.shape[0])]))
        for n, s in methods.items()
        if n != reference
    }


def removal_sets(scores: np.ndarray, qi: int, k: int, n: int, seed: int) -> tuple[list[int], list[int]]:
    """(examples kept after removing the query's top-k, kept after removing k random examples)."""
    top = set(np.argsort(-scores[qi], kind="stable")[:k].tolist())
    rng = np.random.default_rng(seed + 7919 * qi + k)
    rand = set(rng.choice(n, size=k, replace=False).tolist())
    return [i for i in range(n) if i not in top], [i for i in range(n) if i not in rand]


def keep_key(keep: list[int], n: int) -> str:
    mask = np.zeros(n, dtype=bool)
    mask[keep] = True
    return _keep_key(mask)


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
        order = np.argsort(-scores[rows], axis=1, kind="stable")[:, :50]
        rankings = {query_ids[r]: [docs[i] for i in order[j]] for j, r in enumerate(rows)}
        return fact_tracing_metrics(rankings, {q: set(relevant[q]) for q in rankings}, k=10)["mrr"]
    return float(linear_datamodeling_score(scores[rows], masks, actual[rows])["lds"])


@task(name="calibrate_damping", tags=["gpu"])
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
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """Choose the damping factor that maximizes a proxy on a random half of the queries, report it on the
    other half, and record the choice in the index manifest (queries then use it by default).
    """
    from dataworth.attribution.scoring import Scorer

    from .query import index_curvature, index_query_gradients

    if proxy == "fact_mrr" and relevant is None:
        raise ValueError(
            "calibrate proxy 'fact_mrr' needs known relevant documents (a fact benchmark); use proxy='lds'"
        )
    if proxy == "lds" and (masks_path is None or actual is None):
        raise ValueError("calibrate proxy 'lds' needs retrained subsets; enable lds or use proxy='fact_mrr'")
    store = IndexStore(index_uri)
    manifest = store.read_manifest()
    encoded, q_grads = index_query_gradients(store, manifest, queries, GenerationConfig(), 16)
    query_ids = [q.id for q in encoded]
    fitted = index_curvature(store, manifest, manifest["config"]["curvature"]["damping_factor"])
    n = manifest["num_examples"]
    curv_modes = [m for m in modes if m != "dot"] or ["influence"]
    scorers = {
        df: Scorer(q_grads, fitted.with_damping(df), curv_modes, top_k=1, full_matrix_size=n) for df in damping_factors
    }
    for ids, vectors, _ in store.iter_gradients(4096, version=manifest["gradients_version"]):
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
    if record:
        record_calibration.fn(index_uri, result, run_id, tracking_uri)
    return result


@task(name="record_calibration", **IO_RETRIES)
def record_calibration(
    index_uri: str, calibration: dict, run_id: str | None = None, tracking_uri: str | None = None
) -> None:
    """Write the chosen calibration into the index manifest: queries then use its damping by default."""
    store = IndexStore(index_uri)
    store.publish_manifest({**store.read_manifest(), "calibration": calibration})
    tracker = Tracker.attach(tracking_uri, run_id)
    tracker.metrics(
        {
            "calibrated_damping_factor": calibration["damping_factor"],
            f"calibration.{calibration['proxy']}.test": calibration["test"],
            **{f"calibrated_{k}": v for k, v in calibration.get("logging", {}).items()},
        }
    )
    tracker.artifact_text("calibration.json", json.dumps(calibration, indent=2))
