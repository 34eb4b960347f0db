"""Benchmark preparation: a generated corpus with known structure and a tiny model trained on it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger, task

from dataworth.benchmarks.presets import BENCHMARKS
from dataworth.benchmarks.tiny_model import fact_accuracy, train_tiny_gpt2
from dataworth.config import CurvatureConfig, DataConfig, IndexConfig, LoggingConfig, ModelConfig, TrackingConfig

from .common import CACHE
from .tracking import Tracker


def _generate(kind: str, corpus_kwargs: dict, seed: int):
    if kind == "facts":
        from dataworth.benchmarks.facts import generate_fact_corpus, write_fact_corpus

        return generate_fact_corpus(**corpus_kwargs, seed=seed), write_fact_corpus
    from dataworth.benchmarks.stories import LM_CORPUS_SIZES, generate_lm_corpus, write_lm_corpus

    return generate_lm_corpus(**{**LM_CORPUS_SIZES["small"], **corpus_kwargs}, seed=seed), write_lm_corpus


@task(name="prepare_benchmark", cache_policy=CACHE - "progress", persist_result=True)
def prepare_benchmark(
    workspace: str,
    benchmark: str,
    seed: int,
    train_epochs: int | None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    progress: bool = True,
) -> dict:
    """Write the generated corpus and queries as JSONL and train a tiny GPT-2 on the documents."""
    log = get_run_logger()
    preset = BENCHMARKS[benchmark]
    ws = Path(workspace).absolute()
    corpus, write = _generate(preset["kind"], preset["corpus"], seed)
    paths = write(corpus, ws / "corpus")
    train_kwargs = {"seed": seed, **preset.get("train", {}), **({"epochs": train_epochs} if train_epochs else {})}
    start = time.perf_counter()
    result = train_tiny_gpt2([d["text"] for d in corpus.documents], ws / "model", progress=progress, **train_kwargs)
    seconds = time.perf_counter() - start
    out = {
        "kind": preset["kind"],
        "model_dir": str(result.path),
        "documents": str(paths["documents"]),
        "queries": str(paths["queries"]),
        "train_kwargs": train_kwargs,
        "train_seconds": seconds,
        "train_steps": result.steps,
        "num_documents": len(corpus.documents),
    }
    metrics = {"train_seconds": seconds, "train_final_loss": result.final_loss}
    if preset["kind"] == "facts":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(result.path).eval()
        tokenizer = AutoTokenizer.from_pretrained(result.path)
        out["fact_accuracy"] = metrics["fact_accuracy"] = fact_accuracy(model, tokenizer, corpus.queries)
        out["relevant"] = {q["id"]: q["relevant_document_ids"] for q in corpus.queries}
        out["expected"] = {q["id"]: q["completion"] for q in corpus.queries}
    Path(result.path, "dataworth_recipe.json").write_text(json.dumps(train_kwargs, indent=2))
    Tracker.attach(tracking_uri, run_id).metrics(metrics)
    log.info("benchmark %s: %d documents, model trained in %.0f s", benchmark, len(corpus.documents), seconds)
    return out


def benchmark_index_config(
    bench: dict, logging: LoggingConfig, curvature: CurvatureConfig, index_uri: str, tracking: TrackingConfig
) -> IndexConfig:
    """The index config of a prepared benchmark (its documents fit the model's 128-token context)."""
    return IndexConfig(
        model=ModelConfig(name_or_path=bench["model_dir"]),
        data=DataConfig(dataset=bench["documents"], id_column="id", source_column="source", max_length=128),
        logging=logging,
        curvature=curvature,
        index_uri=index_uri,
        overwrite=True,
        tracking=tracking,
    )
