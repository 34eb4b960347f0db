"""Demo stages: generate the fact corpus and train the tiny model; evaluate fact tracing."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger, task

from dataworth.demo_corpus import FACT_CORPUS_SIZES, generate_fact_corpus, write_fact_corpus
from dataworth.evaluation import fact_tracing_metrics
from dataworth.tiny_model import fact_accuracy, train_tiny_gpt2

from .common import CACHE
from .query import load_results
from .tracking import Tracker


@task(name="prepare_demo", cache_policy=CACHE, persist_result=True)
def prepare_demo(workspace: str, corpus_size: str, seed: int, train_epochs: int | None,
                 run_id: str | None = None, tracking_uri: str | None = None) -> dict:
    """Write the generated corpus and queries as JSONL and train a tiny GPT-2 on the documents."""
    log = get_run_logger()
    ws = Path(workspace).absolute()
    corpus = generate_fact_corpus(**{**FACT_CORPUS_SIZES[corpus_size], "seed": seed})
    paths = write_fact_corpus(corpus, ws / "corpus")
    start = time.perf_counter()
    extra = {"epochs": train_epochs} if train_epochs else {}
    result = train_tiny_gpt2([d["text"] for d in corpus.documents], ws / "model", seed=seed, **extra)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(result.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.path)
    accuracy = fact_accuracy(model, tokenizer, corpus.queries)
    seconds = time.perf_counter() - start
    Tracker.attach(tracking_uri, run_id).metrics(
        {"train_seconds": seconds, "train_final_loss": result.final_loss, "fact_accuracy": accuracy}
    )
    log.info("trained the demo model in %.0f s: loss %.3f, fact accuracy %.2f", seconds, result.final_loss, accuracy)
    return {
        "model_dir": str(result.path),
        "documents": str(paths["documents"]),
        "queries": str(paths["queries"]),
        "relevant": {q["id"]: q["relevant_document_ids"] for q in corpus.queries},
        "expected": {q["id"]: q["completion"] for q in corpus.queries},
        "fact_accuracy": accuracy,
        "train_seconds": seconds,
        "num_documents": len(corpus.documents),
    }


def states_value(completion: str, value: str) -> bool:
    """The completion starts with the value as a whole word (" Saltmere" in " Saltmere, where...")."""
    completion, value = completion.strip(), value.strip()
    return completion.startswith(value) and not completion[len(value) : len(value) + 1].isalnum()


@task(name="evaluate_fact_tracing")
def evaluate_fact_tracing(index_uri: str, srid: str, relevant: dict[str, list[str]], expected: dict[str, str],
                          k: int = 10, run_id: str | None = None, tracking_uri: str | None = None) -> dict:
    """MRR and recall@k of the fact-bearing documents, per mode, over the queries the model got right.

    A query whose generated completion is not the fact has no known ground truth to trace.
    """
    queries, results = load_results(index_uri, srid)
    correct = {q["query_id"] for q in queries if states_value(q["completion"], expected[q["query_id"]])}
    metrics = {}
    for mode, by_query in results.items():
        rankings = {q: [r["document_id"] for r in rows] for q, rows in by_query.items() if q in correct}
        m = fact_tracing_metrics(rankings, {q: set(relevant[q]) for q in rankings}, k=k)
        metrics[mode] = {"mrr": m["mrr"], f"recall@{k}": m[f"recall@{k}"]}
    tracker = Tracker.attach(tracking_uri, run_id)
    for mode, m in metrics.items():
        tracker.metrics({f"{mode}.{name}": v for name, v in m.items()})
    tracker.metrics({"queries_correct": len(correct), "queries_total": len(queries)})
    tracker.artifact_text("fact_tracing.json", json.dumps(metrics, indent=2))
    return {"metrics": metrics, "correct": len(correct), "total": len(queries)}
